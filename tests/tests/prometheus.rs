//! The metrics as operators see them: a real Prometheus scrapes the agent
//! while VMs run and a migration happens; every query of every Grafana
//! dashboard, variables filled in, returns data; `promtool check metrics`
//! finds nothing to fix.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent::migrate::report::Mode;
use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir, agent_binary, free_port},
    images::{FleetLayout, fleet_image},
    migration::{self, ReceiveSpec, SendSpec},
    privileged,
    prometheus::{self, Prometheus, http_get},
    vmm_client::{Op, VmmArgs, VmmProcess, testvmm_binary},
};
use serde_json::Value;

const MEM_MIB: u32 = 32;

fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../grafana/dashboards");
    let mut all: Vec<(PathBuf, Value)> = std::fs::read_dir(&dir)
        .expect("grafana/dashboards exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let json = serde_json::from_slice(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, json)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// (dashboard, panel title, expr) of every panel query.
fn queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (path, dashboard) in dashboards() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                out.push((
                    name.clone(),
                    panel["title"].as_str().unwrap().to_string(),
                    target["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    out
}

#[test]
fn dashboards_provision_without_import_inputs() {
    let all = dashboards();
    assert!(all.len() >= 4, "fleet, dedup, cost and migration dashboards");
    for (path, dashboard) in &all {
        let text = serde_json::to_string(dashboard).unwrap();
        assert!(dashboard.get("__inputs").is_none() && !text.contains("${DS_"), "{}: import inputs are not filled by file provisioning", path.display());
        let vars: Vec<&str> = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(vars.contains(&"datasource") && vars.contains(&"instance"), "{}: {vars:?}", path.display());
        for panel in dashboard["panels"].as_array().unwrap() {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}: {}", path.display(), panel["title"]);
            for target in panel["targets"].as_array().unwrap() {
                assert_eq!(target["datasource"]["uid"], "${datasource}");
            }
        }
    }
    let provisioning = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../grafana/provisioning");
    for file in ["datasources/pagefp.yaml", "dashboards/pagefp.yaml"] {
        assert!(provisioning.join(file).is_file(), "grafana/provisioning/{file}");
    }
}

fn vmm(dir: &TempDir, name: &str, image: Option<PathBuf>, incoming: bool) -> VmmProcess {
    let mut args = VmmArgs::new(dir.0.join(format!("{name}-{}.sock", free_port())), MEM_MIB);
    args.image = image;
    args.incoming = incoming;
    VmmProcess::spawn(&testvmm_binary(), &args).expect("starting the test VMM")
}

#[test]
fn prometheus_scrapes_the_agent_and_every_panel_has_data() {
    if !privileged::check("prometheus_scrapes_the_agent_and_every_panel_has_data") {
        return;
    }
    if prometheus::binary().is_none() {
        assert!(!privileged::required(), "prometheus is missing: run `cargo xtask setup`");
        println!("skipped: prometheus_scrapes_the_agent_and_every_panel_has_data: prometheus is not installed (cargo xtask setup)");
        return;
    }
    let started = Instant::now();
    let dir = TempDir::new("pagefp-prom");
    let agent = AgentProcess::start(&AgentOptions {
        ring_buffer_bytes: Some(64 << 20),
        ..AgentOptions::default()
    })
    .unwrap();
    let prom = Prometheus::start(std::slice::from_ref(&agent.metrics_addr)).unwrap();

    // The exposition itself passes promtool.
    let exposition = http_get(&agent.metrics_addr, "/metrics").unwrap();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    promtool.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    let complaints = format!("{}{}", String::from_utf8_lossy(&checked.stdout), String::from_utf8_lossy(&checked.stderr));
    assert!(checked.status.success() && complaints.trim().is_empty(), "promtool check metrics:\n{complaints}");

    // VMs that share memory, writing.
    let images: Vec<PathBuf> = (0..3)
        .map(|i| {
            let path = dir.0.join(format!("fleet-{i}.img"));
            std::fs::write(&path, fleet_image(i, (MEM_MIB * 256) as usize, FleetLayout::default())).unwrap();
            path
        })
        .collect();
    let vms: Vec<VmmProcess> = images.iter().enumerate().map(|(i, p)| vmm(&dir, &format!("vm{i}"), Some(p.clone()), false)).collect();
    for vm in &vms {
        agent.wait_all_clean(vm.pid(), Duration::from_secs(120));
    }
    for (i, vm) in vms.iter().enumerate().skip(1) {
        vm.start_loop_every(&[Op::Touch { first: 100 * i as u32, count: 200, value: 3 }], 20).unwrap();
    }

    // A migration, slowed down so that Prometheus sees it in progress.
    let catalog = dir.0.join("catalog.pftc");
    let output = Command::new(agent_binary())
        .args(["templates", "--socket"])
        .arg(&agent.socket)
        .args(["export", "--out"])
        .arg(&catalog)
        .args(["--vms", &format!("{},{}", vms[1].pid(), vms[2].pid())])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let dest = vmm(&dir, "dest", None, true);
    let listen = format!("127.0.0.1:{}", free_port());
    let receiver = migration::start_receiver(
        &ReceiveSpec {
            listen: listen.clone(),
            vmm_socket: dest.socket().to_path_buf(),
            catalogs: vec![catalog],
            agent_socket: Some(agent.socket.clone()),
            timeout_s: 60,
            ..ReceiveSpec::default()
        },
        None,
    )
    .unwrap();
    let sent = migration::send(
        &SendSpec {
            pid: vms[0].pid(),
            vmm_socket: vms[0].socket().to_path_buf(),
            to: listen,
            mode: Mode::Templates,
            agent_socket: agent.socket.clone(),
            max_bandwidth: Some("4M".into()),
            downtime_ms: None,
            max_rounds: None,
            keep_source: false,
        },
        None,
    )
    .unwrap();
    assert!(sent.success, "{}", sent.stderr);
    assert!(receiver.finish(Duration::from_secs(60)).success);
    println!("migration: {:.1} s, {} bytes", sent.report().elapsed_seconds, sent.report().wire_bytes);
    // A few more scrapes after it ended.
    std::thread::sleep(Duration::from_secs(4));

    // Both ends reported to this host's agent.
    for role in ["source", "destination"] {
        let result = prom
            .query(&format!("pagefp_migrations_completed_total{{role=\"{role}\"}}"))
            .unwrap();
        assert_eq!(result.len(), 1, "{role}: {result:?}");
        assert_eq!(result[0]["value"][1], "1", "{role}");
    }

    let instance = agent.metrics_addr.replace('.', "\\\\.");
    let window = started.elapsed().as_secs() + 5;
    let mut empty = Vec::new();
    let all = queries();
    for (dashboard, title, expr) in &all {
        let expr = expr.replace("$instance", &instance).replace("$vm", ".*");
        let result = prom.query_range(&expr, window).unwrap_or_else(|e| panic!("{dashboard} / {title}: {e}"));
        if result.is_empty() {
            empty.push(format!("{dashboard} / {title}: {expr}"));
        }
    }
    assert!(empty.is_empty(), "panel queries without data:\n{}", empty.join("\n"));
    println!("{} panel queries of {} dashboards returned data", all.len(), dashboards().len());
    for vm in vms {
        let _ = vm.exit();
    }
    let _ = dest.exit();
}
