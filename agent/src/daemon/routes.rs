//! Request routing: plain functions from a request line to a response, so
//! they are tested without a socket.

use std::sync::Arc;

use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes, header};
use serde::Serialize;

use super::{
    hash_list::hash_list,
    migration_book::{Refused, Reporter},
    state::AppState,
    views::vm_view,
};
use crate::{
    api::{
        report::MigrationReport,
        views::{CatalogView, PageLocation, TemplateView, VmView},
        wire::{HashList, state},
    },
    page::hex,
    registry::{PageState, RegistryStats},
    templates::{Selection, SelectionPolicy},
    tracking::ebpf::{
        Sources,
        cost::{self, ProgramCost},
    },
};

pub type ApiResponse = Response<Full<Bytes>>;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

pub fn error(status: StatusCode, message: &str) -> ApiResponse {
    let body = serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn json<T: Serialize>(value: &T) -> ApiResponse {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the answer failed: {err}"),
        ),
    }
}

fn binary(body: Vec<u8>) -> ApiResponse {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Binary,
}

#[derive(Default)]
struct Query {
    format: Option<Format>,
    limit: Option<usize>,
    /// `since=TOKEN` of a hash list: only the changes after it.
    since: Option<String>,
    selection: TemplateQuery,
}

/// Which VMs `GET /v1/templates` selects among, and how.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TemplateQuery {
    /// `vms=PID,PID`: only these VMs.
    vms: Option<Vec<u32>>,
    /// `exclude=PID,PID`: never these.
    exclude: Vec<u32>,
    /// `min_vms=N`, `budget_bytes=N`: instead of the agent's policy.
    min_vms: Option<u32>,
    budget_bytes: Option<u64>,
    /// `locations=1`: where one copy of each template lives.
    locations: bool,
}

impl TemplateQuery {
    /// Whether the answer differs from the host's cached catalog.
    fn is_custom(&self) -> bool {
        self.vms.is_some()
            || !self.exclude.is_empty()
            || self.min_vms.is_some()
            || self.budget_bytes.is_some()
    }
}

/// Most pids a `vms=` or `exclude=` list may name.
const MAX_PIDS: usize = 4096;

fn parse_number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{key} must be a whole number, not `{value}`"))
}

fn parse_pids(key: &str, value: &str) -> Result<Vec<u32>, String> {
    let pids: Vec<u32> = value
        .split(',')
        .filter(|pid| !pid.is_empty())
        .map(|pid| parse_number(key, pid))
        .collect::<Result<_, _>>()?;
    if pids.len() > MAX_PIDS {
        return Err(format!("{key} names more than {MAX_PIDS} VMs"));
    }
    Ok(pids)
}

fn parse_query(query: Option<&str>) -> Result<Query, String> {
    let mut parsed = Query::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "format" => {
                parsed.format = Some(match value {
                    "json" => Format::Json,
                    "bin" | "binary" => Format::Binary,
                    other => {
                        return Err(format!(
                            "unknown format `{other}`: use format=json or format=bin"
                        ));
                    }
                })
            }
            "limit" => parsed.limit = Some(parse_number(key, value)?),
            "since" => parsed.since = Some(value.to_owned()),
            "vms" => parsed.selection.vms = Some(parse_pids(key, value)?),
            "exclude" => parsed.selection.exclude = parse_pids(key, value)?,
            "min_vms" => parsed.selection.min_vms = Some(parse_number(key, value)?),
            "budget_bytes" => parsed.selection.budget_bytes = Some(parse_number(key, value)?),
            "locations" => {
                parsed.selection.locations = match value {
                    "1" | "true" | "" => true,
                    "0" | "false" => false,
                    other => return Err(format!("locations is 1 or 0, not `{other}`")),
                }
            }
            other => {
                return Err(format!(
                    "unknown query parameter `{other}` (known: format, limit; for /v1/templates also vms, exclude, min_vms, budget_bytes, locations)"
                ));
            }
        }
    }
    Ok(parsed)
}

/// Largest request body accepted (a migration report).
pub const MAX_BODY: usize = 256 << 10;

/// Answers one request. Blocking: call from a blocking context.
pub fn handle(
    state: &AppState,
    method: &hyper::Method,
    path: &str,
    query: Option<&str>,
) -> ApiResponse {
    handle_with_body(state, method, path, query, &[], None)
}

/// [`handle`] for requests with a body (`POST /v1/migrations`); `peer_pid`
/// is the pid of the process on the other end of the socket, when known.
pub fn handle_with_body(
    state: &AppState,
    method: &hyper::Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
    peer_pid: Option<u32>,
) -> ApiResponse {
    if path.trim_end_matches('/') == "/v1/migrations" && method == hyper::Method::POST {
        return post_migration(state, body, peer_pid);
    }
    if method != hyper::Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported (and POST on /v1/migrations)",
        );
    }
    let query = match parse_query(query) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "status"] => status(state),
        ["v1", "vms"] => vms(state),
        ["v1", "vms", pid] => match parse_pid(pid) {
            Ok(pid) => one_vm(state, pid),
            Err(response) => response,
        },
        ["v1", "vms", pid, "hashes"] => match parse_pid(pid) {
            Ok(pid) => hashes(
                state,
                pid,
                query.since.as_deref(),
                query.format.unwrap_or(Format::Binary),
            ),
            Err(response) => response,
        },
        ["v1", "templates"] => templates(
            state,
            &query.selection,
            query.format.unwrap_or(Format::Json),
            query.limit,
        ),
        ["v1", "migrations"] => {
            let mut book = state.migrations.lock().unwrap();
            book.sweep();
            json(&book.reports())
        }
        _ => error(
            StatusCode::NOT_FOUND,
            &format!(
                "no such endpoint `{path}`: try /v1/status, /v1/vms, /v1/vms/PID, /v1/vms/PID/hashes, /v1/templates, /v1/migrations"
            ),
        ),
    }
}

/// `POST /v1/migrations`: a progress report of `pagefp migrate`, posted by
/// process `peer_pid`.
fn post_migration(state: &AppState, body: &[u8], peer_pid: Option<u32>) -> ApiResponse {
    if body.len() > MAX_BODY {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("a migration report is at most {MAX_BODY} bytes"),
        );
    }
    let report: MigrationReport = match serde_json::from_slice(body) {
        Ok(report) => report,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "the body is not a migration report (JSON, as `pagefp migrate --json` prints): {e}"
                ),
            );
        }
    };
    let reporter = peer_pid.filter(|pid| *pid > 0).map(Reporter::new);
    match state.migrations.lock().unwrap().record(report, reporter) {
        Ok(()) => json(&serde_json::json!({"ok": true})),
        Err(refused) => error(
            match refused {
                Refused::Invalid(_) => StatusCode::BAD_REQUEST,
                Refused::Conflict(_) => StatusCode::CONFLICT,
                Refused::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            },
            refused.message(),
        ),
    }
}

#[expect(
    clippy::result_large_err,
    reason = "the error is the HTTP answer itself, built once per bad request"
)]
fn parse_pid(text: &str) -> Result<u32, ApiResponse> {
    text.parse().map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("`{text}` is not a VM id (the VMM's pid)"),
        )
    })
}

fn unknown_vm(pid: u32) -> ApiResponse {
    error(
        StatusCode::NOT_FOUND,
        &format!("no VM with pid {pid} is known: see GET /v1/vms"),
    )
}

#[derive(Serialize)]
struct StatusView {
    version: &'static str,
    uptime_seconds: f64,
    sources: Sources,
    /// The kernel counts eBPF run time now (`ebpf_run_stats`, or
    /// `kernel.bpf_stats_enabled`); `ebpf_programs` counts only then.
    ebpf_run_stats: bool,
    ebpf_programs: Vec<ProgramCost>,
    vms: usize,
    distinct_contents: usize,
    templates: usize,
    template_bytes: u64,
    hash_jobs_pending: u64,
    hashing: crate::hasher::HashStatsView,
    events: u64,
    registry: RegistryStats,
    /// The site store publisher (absent when no site store is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    site: Option<super::site_publisher::SiteStatus>,
}

fn status(state: &AppState) -> ApiResponse {
    let catalog = state.template_selection();
    let registry = state.registry.lock().unwrap();
    json(&StatusView {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs_f64(),
        sources: state.sources.clone(),
        ebpf_run_stats: cost::run_stats_on(state.sources.run_stats_held),
        ebpf_programs: cost::program_costs(&state.sources.programs),
        vms: registry.vms().count(),
        distinct_contents: registry.contents.len(),
        templates: catalog.templates.len(),
        template_bytes: catalog.bytes(),
        hash_jobs_pending: state.pool.as_ref().map_or(0, |p| p.pending()),
        hashing: state
            .pool
            .as_ref()
            .map(|p| p.stats.view())
            .unwrap_or_default(),
        events: state
            .tracker
            .events
            .load(std::sync::atomic::Ordering::Relaxed),
        registry: registry.stats.clone(),
        site: state
            .site
            .as_ref()
            .map(|site| site.lock().unwrap_or_else(|p| p.into_inner()).clone()),
    })
}

fn vms(state: &AppState) -> ApiResponse {
    let catalog = state.template_selection();
    let registry = state.registry.lock().unwrap();
    let views: Vec<VmView> = registry
        .vms()
        .map(|vm| vm_view(&registry, vm, &catalog))
        .collect();
    json(&views)
}

fn one_vm(state: &AppState, pid: u32) -> ApiResponse {
    let catalog = state.template_selection();
    let registry = state.registry.lock().unwrap();
    match registry.vm(pid) {
        Some(vm) => json(&vm_view(&registry, vm, &catalog)),
        None => unknown_vm(pid),
    }
}

#[derive(Serialize)]
struct PageJson {
    gpa: u64,
    state: PageState,
    zero: bool,
    hash: Option<String>,
}

fn hashes(state: &AppState, pid: u32, since: Option<&str>, format: Format) -> ApiResponse {
    let listed = match hash_list(state, pid, since) {
        Ok(Some(listed)) => listed,
        Ok(None) => return unknown_vm(pid),
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    match format {
        Format::Json => {
            let pages: Vec<PageJson> = listed
                .records
                .iter()
                .map(|r| PageJson {
                    gpa: r.gpa,
                    state: match r.state {
                        state::CLEAN => PageState::Clean,
                        state::UNVERIFIED => PageState::Unverified,
                        state::DIRTY => PageState::Dirty,
                        _ => PageState::Unknown,
                    },
                    zero: r.zero == 1,
                    hash: matches!(r.state, state::CLEAN | state::UNVERIFIED).then(|| hex(&r.hash)),
                })
                .collect();
            json(&pages)
        }
        Format::Binary => binary(HashList::encode(
            &listed.header,
            &listed.token,
            &listed.records,
        )),
    }
}

/// `GET /v1/templates`: the host's catalog (cached per content epoch), or
/// the same selection among some VMs (`vms=`, `exclude=`) or under another
/// policy, as `pagefp templates export` and the receivers ask for it.
fn templates(
    state: &AppState,
    selection: &TemplateQuery,
    format: Format,
    limit: Option<usize>,
) -> ApiResponse {
    let policy = SelectionPolicy {
        min_vms: selection.min_vms.unwrap_or(state.policy.min_vms),
        budget_bytes: selection.budget_bytes.unwrap_or(state.policy.budget_bytes),
    };
    let host_catalog = (!selection.is_custom()).then(|| state.template_selection());
    let registry = state.registry.lock().unwrap();
    let counted: Vec<u32> = registry
        .vms()
        .map(|vm| vm.pid)
        .filter(|pid| selection.vms.as_ref().is_none_or(|vms| vms.contains(pid)))
        .filter(|pid| !selection.exclude.contains(pid))
        .collect();
    if let Some(missing) = selection
        .vms
        .iter()
        .flatten()
        .find(|pid| registry.vm(**pid).is_none())
    {
        return unknown_vm(*missing);
    }
    let catalog = match host_catalog {
        Some(catalog) => catalog,
        None => Arc::new(Selection::select_among(
            &registry.contents,
            counted
                .iter()
                .filter_map(|pid| registry.vm(*pid))
                .map(|vm| &vm.counts),
            policy,
        )),
    };
    let shown = limit.map_or(catalog.templates.len(), |limit| {
        limit.min(catalog.templates.len())
    });
    let templates = &catalog.templates[..shown];
    let locations = if selection.locations {
        registry.locate_contents(&counted, templates.iter().map(|t| t.id))
    } else {
        Default::default()
    };
    drop(registry);
    match format {
        Format::Json => json(&CatalogView {
            min_vms: catalog.policy.min_vms,
            budget_bytes: catalog.policy.budget_bytes,
            vms: counted,
            selected: catalog.templates.len(),
            pages_covered: catalog.pages_covered,
            eligible: catalog.eligible,
            templates: templates
                .iter()
                .map(|t| TemplateView {
                    index: t.index,
                    hash: t.hash,
                    pages: t.pages,
                    vms: t.vms,
                    at: locations
                        .get(&t.id)
                        .map(|&(pid, uaddr)| PageLocation { pid, uaddr }),
                })
                .collect(),
        }),
        Format::Binary => {
            // Records: index u32 LE, then the 32-byte hash.
            let mut body = Vec::with_capacity(templates.len() * 36);
            for template in templates {
                body.extend_from_slice(&template.index.to_le_bytes());
                body.extend_from_slice(&template.hash);
            }
            binary(body)
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::page::PAGE_SIZE;

    fn state() -> AppState {
        AppState::empty()
    }

    fn body(response: ApiResponse) -> String {
        let bytes = futures_body(response);
        String::from_utf8(bytes).unwrap()
    }

    fn futures_body(response: ApiResponse) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec()
        })
    }

    /// Three shared-memory VMs (pids 1, 2, 3) of four pages each, hashed:
    /// page contents by letter.
    fn three_vms() -> AppState {
        use crate::registry::{RamRegion, SharedRamGuest};
        let state = AppState::empty();
        let contents: [(u32, [u8; 4]); 3] = [(1, *b"AABC"), (2, *b"ABDE"), (3, *b"CCCD")];
        let mut registry = state.registry.lock().unwrap();
        for (pid, _) in contents {
            registry.adopt_shared_ram(&SharedRamGuest {
                pid,
                regions: vec![RamRegion {
                    uaddr: u64::from(pid) << 32,
                    size: 4 * PAGE_SIZE as u64,
                    offset: 0,
                    path: format!("/dev/shm/vm{pid}"),
                }],
            });
        }
        for job in registry.rescan_jobs(1000) {
            let plan = registry.plan(&job).unwrap();
            let letters = contents.iter().find(|(pid, _)| *pid == job.pid).unwrap().1;
            let hashes: Vec<_> = plan
                .pages
                .iter()
                .map(|(page, _)| Some([letters[*page as usize]; 32]))
                .collect();
            registry.commit(&job, &plan, &hashes);
        }
        drop(registry);
        state
    }

    fn catalog(state: &AppState, query: &str) -> CatalogView {
        let response = handle(state, &hyper::Method::GET, "/v1/templates", Some(query));
        assert_eq!(response.status(), StatusCode::OK);
        serde_json::from_str(&body(response)).unwrap()
    }

    fn hashes(view: &CatalogView) -> Vec<u8> {
        view.templates.iter().map(|t| t.hash[0]).collect()
    }

    #[test]
    fn templates_are_selected_among_the_vms_asked_for_with_where_they_live() {
        let state = three_vms();
        let host = catalog(&state, "");
        assert_eq!(hashes(&host), b"CABD".to_vec());
        assert_eq!(host.vms, vec![1, 2, 3]);
        assert_eq!(host.pages_covered, 4 + 3 + 2 + 2);
        assert!(host.templates.iter().all(|t| t.at.is_none()));

        let two = catalog(&state, "vms=1,2&locations=1");
        assert_eq!(hashes(&two), b"AB".to_vec());
        assert_eq!(two.templates[0].pages, 3);
        assert_eq!(
            two.templates[0].at,
            Some(PageLocation {
                pid: 1,
                uaddr: 1 << 32
            })
        );
        assert_eq!(
            two.templates[1].at,
            Some(PageLocation {
                pid: 1,
                uaddr: (1 << 32) + 2 * PAGE_SIZE as u64
            })
        );
        assert_eq!(catalog(&state, "exclude=3").templates, {
            let mut plain = two.templates.clone();
            plain.iter_mut().for_each(|t| t.at = None);
            plain
        });

        let one_vm = catalog(&state, "vms=3&min_vms=1&budget_bytes=4096&locations=1");
        assert_eq!(hashes(&one_vm), b"C".to_vec());
        assert_eq!(one_vm.selected, 1);
        assert_eq!(one_vm.eligible, 2);
        assert_eq!(one_vm.templates[0].at.unwrap().pid, 3);

        let limited = catalog(&state, "limit=1");
        assert_eq!((limited.selected, limited.templates.len()), (4, 1));

        let unknown = handle(
            &state,
            &hyper::Method::GET,
            "/v1/templates",
            Some("vms=1,9"),
        );
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
        assert!(body(unknown).contains("pid 9"));
    }

    #[test]
    fn a_hash_list_read_in_chunks_is_whole_and_in_order() {
        use crate::{
            api::wire::parse_hash_list,
            registry::{RamRegion, SharedRamGuest},
        };
        let pages = 2 * super::super::hash_list::HASH_LIST_CHUNK + 100;
        let state = AppState::empty();
        {
            let mut registry = state.registry.lock().unwrap();
            registry.adopt_shared_ram(&SharedRamGuest {
                pid: 7,
                regions: vec![RamRegion {
                    uaddr: 7 << 32,
                    size: u64::from(pages) * PAGE_SIZE as u64,
                    offset: 0,
                    path: "/dev/shm/vm7".into(),
                }],
            });
            // Every page but the last hashed, its hash naming its index.
            for job in registry.rescan_jobs(pages - 1) {
                let plan = registry.plan(&job).unwrap();
                let hashes: Vec<_> = plan
                    .pages
                    .iter()
                    .map(|(page, _)| {
                        let mut hash = [0xa5; 32];
                        hash[..4].copy_from_slice(&page.to_le_bytes());
                        Some(hash)
                    })
                    .collect();
                registry.commit(&job, &plan, &hashes);
            }
        }
        let response = handle(&state, &hyper::Method::GET, "/v1/vms/7/hashes", None);
        assert_eq!(response.status(), StatusCode::OK);
        let body = futures_body(response);
        let list = parse_hash_list(&body).unwrap();
        assert_eq!(list.header.count, u64::from(pages));
        assert!(!list.is_delta());
        for (index, record) in list.records.iter().enumerate() {
            assert_eq!(record.gpa, (index * PAGE_SIZE) as u64);
            if index as u32 == pages - 1 {
                assert_eq!(record.state, state::UNKNOWN);
            } else {
                assert_eq!(record.state, state::UNVERIFIED, "page {index}");
                assert_eq!(record.hash[..4], (index as u32).to_le_bytes());
            }
        }
    }

    #[test]
    fn malformed_requests_get_4xx_with_a_message() {
        let state = state();
        let get = hyper::Method::GET;
        let cases = [
            (
                hyper::Method::POST,
                "/v1/vms",
                None,
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (
                hyper::Method::POST,
                "/v1/migrations",
                None,
                StatusCode::BAD_REQUEST,
            ),
            (get.clone(), "/v2/nothing", None, StatusCode::NOT_FOUND),
            (get.clone(), "/v1/vms/abc", None, StatusCode::BAD_REQUEST),
            (get.clone(), "/v1/vms/424242", None, StatusCode::NOT_FOUND),
            (
                get.clone(),
                "/v1/vms/424242/hashes",
                None,
                StatusCode::NOT_FOUND,
            ),
            (
                get.clone(),
                "/v1/templates",
                Some("format=xml"),
                StatusCode::BAD_REQUEST,
            ),
            (
                get.clone(),
                "/v1/templates",
                Some("limit=-1"),
                StatusCode::BAD_REQUEST,
            ),
            (
                get.clone(),
                "/v1/templates",
                Some("colour=red"),
                StatusCode::BAD_REQUEST,
            ),
            (
                get.clone(),
                "/v1/templates",
                Some("vms=1,x"),
                StatusCode::BAD_REQUEST,
            ),
            (
                get.clone(),
                "/v1/templates",
                Some("min_vms=two"),
                StatusCode::BAD_REQUEST,
            ),
            (
                get.clone(),
                "/v1/templates",
                Some("locations=maybe"),
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (method, path, query, expected) in cases {
            let response = handle(&state, &method, path, query);
            assert_eq!(response.status(), expected, "{method} {path}");
            let text = body(response);
            let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(
                parsed["error"].as_str().is_some_and(|m| m.len() > 10),
                "{text}"
            );
        }
    }

    #[test]
    fn migration_reports_are_checked_and_listed() {
        use crate::api::report::{Mode, Phase, Role};
        let state = state();
        let report = |mode: Mode, phase: Phase| MigrationReport {
            phase,
            round: 1,
            started_unix_ms: 5,
            elapsed_seconds: 1.0,
            mem_bytes: 4096,
            wire_bytes: 1,
            ..MigrationReport::new("m-1".into(), Role::Destination, mode, 9, "peer".into())
        };
        let post = |body: &[u8]| {
            handle_with_body(
                &state,
                &hyper::Method::POST,
                "/v1/migrations",
                None,
                body,
                None,
            )
        };
        let running = serde_json::to_vec(&report(Mode::Baseline, Phase::Precopy)).unwrap();
        assert_eq!(post(&running).status(), StatusCode::OK);
        let other_mode = serde_json::to_vec(&report(Mode::Templates, Phase::Precopy)).unwrap();
        let refused = post(&other_mode);
        assert_eq!(refused.status(), StatusCode::CONFLICT);
        assert!(body(refused).contains("mode"));
        assert_eq!(
            post(&vec![b'{'; MAX_BODY + 1]).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let listed = handle(&state, &hyper::Method::GET, "/v1/migrations", None);
        let listed: Vec<MigrationReport> = serde_json::from_str(&body(listed)).unwrap();
        assert_eq!(listed, vec![report(Mode::Baseline, Phase::Precopy)]);
        let put = handle(&state, &hyper::Method::PUT, "/v1/migrations", None);
        assert_eq!(put.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn empty_agent_answers() {
        let state = state();
        let response = handle(&state, &hyper::Method::GET, "/v1/vms", None);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response).trim(), "[]");
        let response = handle(
            &state,
            &hyper::Method::GET,
            "/v1/templates",
            Some("format=bin"),
        );
        assert!(futures_body(response).is_empty());
    }
}
