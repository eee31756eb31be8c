//! The metrics as operators see them: a real Prometheus scrapes a real agent
//! every second while VMs run and write and a real migration happens; then
//! every query of every Grafana dashboard panel, with its variables filled in
//! as Grafana would, returns data from Prometheus's query API, and `promtool
//! check metrics` finds nothing to fix in the exposition.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use agent::api::report::Mode;
use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir, agent_binary, free_port},
    migration::{self, ReceiveSpec, SendSpec},
    privileged,
    prometheus::{
        self, Dashboard, Prometheus, dashboards, expand, numbers, promtool_check_metrics,
        regex_value,
    },
    synthetic_images::{FleetLayout, fleet_image},
    vmm_client::{Op, VmmArgs, VmmProcess, testvmm_binary},
};

const MEM_MIB: u32 = 32;
/// `$__rate_interval` as Grafana would compute it for a 1 s scrape interval
/// and a short time range (at least four scrapes).
const RATE_INTERVAL: &str = "10s";

#[test]
fn dashboards_provision_without_import_inputs() {
    let all = dashboards();
    let titles: Vec<&str> = all
        .iter()
        .map(|d| d.json["title"].as_str().unwrap())
        .collect();
    assert!(
        all.len() >= 4,
        "fleet, dedup, cost and migration dashboards: {titles:?}"
    );
    let mut uids = BTreeSet::new();
    for dashboard in &all {
        let file = &dashboard.file;
        let text = serde_json::to_string(&dashboard.json).unwrap();
        assert!(
            dashboard.json.get("__inputs").is_none() && !text.contains("${DS_"),
            "{file}: import inputs (${{DS_...}}) are not filled by file provisioning"
        );
        assert!(
            uids.insert(dashboard.json["uid"].as_str().unwrap().to_string()),
            "{file}: uid used twice"
        );
        let variables = dashboard.variables();
        let names: Vec<&str> = variables
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        for needed in ["datasource", "instance", "vm"] {
            assert!(
                names.contains(&needed),
                "{file}: variable {needed}: {names:?}"
            );
        }
        for variable in &variables {
            if variable["type"] == "datasource" {
                assert_eq!(variable["query"], "prometheus", "{file}");
            } else {
                assert_eq!(
                    variable["datasource"]["uid"], "${datasource}",
                    "{file}: variable {}",
                    variable["name"]
                );
            }
        }
        assert_eq!(
            dashboard.query_variables().len(),
            2,
            "{file}: instance and vm"
        );
        let mut ids = BTreeSet::new();
        for panel in dashboard.json["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            assert!(
                ids.insert(panel["id"].as_u64().unwrap()),
                "{file}: {title}: id used twice"
            );
            let grid = &panel["gridPos"];
            assert!(
                grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
                "{file}: {title}: wider than the grid"
            );
            if panel["type"] == "row" {
                continue;
            }
            assert!(
                ["timeseries", "stat", "bargauge", "table"]
                    .contains(&panel["type"].as_str().unwrap()),
                "{file}: {title}: panel type {}",
                panel["type"]
            );
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{file}: {title}"
            );
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: {title}: no query");
            for target in targets {
                assert_eq!(
                    target["datasource"]["uid"], "${datasource}",
                    "{file}: {title}"
                );
                assert!(target["expr"].as_str().is_some_and(|e| !e.is_empty()));
            }
        }
    }
    let provisioning = prometheus::grafana_dir().join("provisioning");
    for file in ["datasources/pagefp.yaml", "dashboards/pagefp.yaml"] {
        let text = std::fs::read_to_string(provisioning.join(file))
            .unwrap_or_else(|e| panic!("grafana/provisioning/{file}: {e}"));
        assert!(text.contains("apiVersion: 1"), "{file}");
    }
}

fn vmm(dir: &TempDir, name: &str, image: Option<PathBuf>, incoming: bool) -> VmmProcess {
    let mut args = VmmArgs::new(dir.0.join(format!("{name}-{}.sock", free_port())), MEM_MIB);
    args.image = image;
    args.incoming = incoming;
    VmmProcess::spawn(&testvmm_binary(), &args).expect("starting the test VMM")
}

fn assert_promtool_clean(agent: &AgentProcess, when: &str) {
    let complaints = promtool_check_metrics(&agent.metrics()).unwrap();
    assert!(
        complaints.is_empty(),
        "promtool check metrics ({when}):\n{complaints}"
    );
}

/// What Prometheus saw of the migration.
struct MigrationSeen {
    /// A time (Prometheus's clock) when the source was scraped mid-migration.
    during: f64,
    /// Pid of the migrated VM (the source VMM).
    source_pid: u32,
    /// The destination VMM, running the migrated VM.
    dest: VmmProcess,
}

/// A real migration of `source` to an incoming test VMM on this host, both
/// ends reporting to `agent`, slowed down so that Prometheus scrapes it in
/// progress: `pagefp migrate receive` and `pagefp migrate send`.
fn run_migration(
    agent: &AgentProcess,
    prom: &Prometheus,
    dir: &TempDir,
    source: &VmmProcess,
    template_vms: &[u32],
) -> MigrationSeen {
    let catalog = dir.0.join("catalog.pftc");
    let vms: Vec<String> = template_vms.iter().map(u32::to_string).collect();
    let output = Command::new(agent_binary())
        .args(["templates", "--socket"])
        .arg(&agent.socket)
        .args(["export", "--out"])
        .arg(&catalog)
        .args(["--vms", &vms.join(",")])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pagefp templates export: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dest = vmm(dir, "dest", None, true);
    let listen = format!("127.0.0.1:{}", free_port());
    let receiver = migration::start_receiver(
        &ReceiveSpec {
            listen: listen.clone(),
            vmm_socket: dest.socket().to_path_buf(),
            catalogs: vec![catalog],
            agent_socket: Some(agent.socket.clone()),
            timeout_s: 120,
            ..ReceiveSpec::default()
        },
        None,
    )
    .unwrap();
    let spec = SendSpec {
        max_bandwidth: Some("2M".into()),
        ..SendSpec::new(
            source.pid(),
            source.socket(),
            listen,
            Mode::Templates,
            &agent.socket,
        )
    };
    let sender = std::thread::spawn(move || migration::send(&spec, None));

    // Prometheus scrapes the source end mid-migration.
    let running = format!(
        "pagefp_migration_round{{role=\"source\", vm=\"{}\"}}",
        source.pid()
    );
    let mut during = None;
    let mut exposition_checked = false;
    while !sender.is_finished() {
        if !exposition_checked && agent.metrics().contains("pagefp_migration_round{") {
            // The exposition with running-migration series passes promtool.
            assert_promtool_clean(agent, "during the migration");
            exposition_checked = true;
        }
        if during.is_none() && !prom.query(&running).unwrap().is_empty() {
            during = Some(prom.now().unwrap());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = sender.join().unwrap().unwrap();
    assert!(sent.success, "pagefp migrate send failed:\n{}", sent.stderr);
    let received = receiver.finish(Duration::from_secs(60));
    assert!(
        received.success,
        "pagefp migrate receive failed:\n{}",
        received.stderr
    );
    let report = sent.report();
    println!(
        "migration {}: {:.1} s, {} bytes on the wire, {} template pages",
        report.id, report.elapsed_seconds, report.wire_bytes, report.pages.template
    );
    assert!(
        exposition_checked,
        "the agent never exported the running migration"
    );
    let during = during.unwrap_or_else(|| {
        panic!(
            "Prometheus never scraped the migration in progress ({:.1} s long)",
            report.elapsed_seconds
        )
    });
    MigrationSeen {
        during,
        source_pid: source.pid(),
        dest,
    }
}

/// Waits until `expr` has a sample equal to `value` in Prometheus.
fn wait_for_value(prom: &Prometheus, expr: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = numbers(&prom.query(expr).unwrap());
        if got.contains(&value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{expr}: expected {value}, Prometheus has {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every panel query of `dashboard`, with `$instance` set to the agent and
/// `$vm` to "All" and to `vm`, must have a number at `times` (any of them).
/// Returns the problems and how many queries ran.
fn check_dashboard(
    prom: &Prometheus,
    dashboard: &Dashboard,
    instance: &str,
    vm: &str,
    window: (f64, f64),
    times: &[f64],
) -> (Vec<String>, usize) {
    let mut problems = Vec::new();
    let range = format!("{}s", (window.1 - window.0).ceil() as u64);
    // The variables offer what the test selects.
    let instance_text = regex_value(Some(instance));
    for variable in dashboard.query_variables() {
        let selector = expand(
            &variable.selector,
            &[("instance", instance_text.clone())],
            RATE_INTERVAL,
            &range,
        );
        let values = prom
            .label_values(&selector, &variable.label, window.0, window.1)
            .unwrap();
        let wanted = if variable.name == "vm" { vm } else { instance };
        if !values.iter().any(|v| v == wanted) {
            problems.push(format!(
                "{}: variable {} offers {values:?}, not {wanted}",
                dashboard.file, variable.name
            ));
        }
    }
    let mut ran = 0;
    for query in dashboard.queries() {
        for vm_choice in [None, Some(vm)] {
            if vm_choice.is_some() && !query.expr.contains("$vm") {
                continue;
            }
            let expr = expand(
                &query.expr,
                &[
                    ("instance", instance_text.clone()),
                    ("vm", regex_value(vm_choice)),
                ],
                RATE_INTERVAL,
                &range,
            );
            ran += 1;
            let mut found = false;
            for time in times {
                match prom.query_at(&expr, *time) {
                    Ok(result) => found |= !numbers(&result).is_empty(),
                    Err(err) => {
                        problems.push(format!("{} / {}: {err}", query.dashboard, query.panel));
                        found = true;
                        break;
                    }
                }
            }
            if !found {
                problems.push(format!(
                    "{} / {}: no data (vm = {}): {expr}",
                    query.dashboard,
                    query.panel,
                    vm_choice.unwrap_or("All")
                ));
            }
        }
    }
    (problems, ran)
}

#[test]
fn prometheus_scrapes_the_agent_and_every_panel_has_data() {
    let test = "prometheus_scrapes_the_agent_and_every_panel_has_data";
    if !privileged::check(test) {
        return;
    }
    if let Err(missing) = prometheus::binaries() {
        assert!(!privileged::required(), "{test}: {missing}");
        eprintln!("skipped: {test}: {missing}");
        return;
    }
    let dir = TempDir::new("pagefp-prom");
    let agent = AgentProcess::start(&AgentOptions {
        ring_buffer_bytes: Some(64 << 20),
        ..AgentOptions::default()
    })
    .unwrap();
    let prom = Prometheus::start(std::slice::from_ref(&agent.metrics_addr)).unwrap();
    let start = prom.now().unwrap();
    // With no VM yet, the exposition already passes promtool.
    assert_promtool_clean(&agent, "no VM");

    // VMs that share memory.
    let images: Vec<PathBuf> = (0..3)
        .map(|i| {
            let path = dir.0.join(format!("fleet-{i}.img"));
            std::fs::write(
                &path,
                fleet_image(i, (MEM_MIB * 256) as usize, FleetLayout::default()),
            )
            .unwrap();
            path
        })
        .collect();
    let vms: Vec<VmmProcess> = images
        .iter()
        .enumerate()
        .map(|(i, p)| vmm(&dir, &format!("vm{i}"), Some(p.clone()), false))
        .collect();
    for vm in &vms {
        agent.wait_all_clean(vm.pid(), Duration::from_secs(120));
    }
    // The VM to migrate rewrites a few pages (a dirty rate, later rounds);
    // two others keep writing more.
    vms[0]
        .start_loop_every(
            &[Op::Touch {
                first: 50,
                count: 20,
                value: 9,
            }],
            50,
        )
        .unwrap();
    for (i, vm) in vms.iter().enumerate().skip(1) {
        vm.start_loop_every(
            &[Op::Touch {
                first: 100 * i as u32,
                count: 200,
                value: 3,
            }],
            20,
        )
        .unwrap();
    }
    assert_promtool_clean(&agent, "VMs running");

    let seen = run_migration(&agent, &prom, &dir, &vms[0], &[vms[1].pid(), vms[2].pid()]);

    // Both ends reported to this host's agent: one completed migration each,
    // scraped by Prometheus; the running-migration series are gone.
    for role in ["source", "destination"] {
        wait_for_value(
            &prom,
            &format!("sum(pagefp_migrations_completed_total{{role=\"{role}\"}})"),
            1.0,
        );
    }
    wait_for_value(&prom, "sum(pagefp_migrations_running)", 0.0);
    let end = prom.now().unwrap();
    assert!(
        prom.query_at("pagefp_migration_remaining_bytes", end)
            .unwrap()
            .is_empty(),
        "series of the finished migration are still scraped"
    );
    assert_eq!(
        numbers(&prom.query_at("up{job=\"pagefp\"}", end).unwrap()),
        vec![1.0],
        "the agent was scraped fine"
    );
    // The remaining bytes of the migration counted down while it ran.
    let remaining = numbers(
        &prom
            .query_range(
                &format!(
                    "pagefp_migration_remaining_bytes{{vm=\"{}\"}}",
                    seen.source_pid
                ),
                start,
                end,
            )
            .unwrap(),
    );
    assert!(
        remaining.len() >= 2 && remaining.last() < remaining.first(),
        "remaining bytes as scraped: {remaining:?}"
    );
    assert_promtool_clean(&agent, "after the migration");

    // Every panel of every dashboard: Grafana's queries, variables filled
    // in, at a moment of the migration and at the end.
    let mut problems = Vec::new();
    let mut ran = 0;
    let all = dashboards();
    for dashboard in &all {
        // The migration dashboard's VM variable lists migrated VMs.
        let vm = if dashboard.json["uid"] == "pagefp-migrations" {
            seen.source_pid
        } else {
            vms[1].pid()
        };
        let (found, n) = check_dashboard(
            &prom,
            dashboard,
            &agent.metrics_addr,
            &vm.to_string(),
            (start, end),
            &[seen.during, end],
        );
        problems.extend(found);
        ran += n;
    }
    assert!(
        problems.is_empty(),
        "{} of {ran} panel queries or variables failed:\n{}",
        problems.len(),
        problems.join("\n")
    );
    println!(
        "{ran} panel queries of {} dashboards returned data (variables filled in)",
        all.len()
    );
    for vm in vms.into_iter().skip(1) {
        let _ = vm.exit();
    }
    let _ = seen.dest.exit();
}
