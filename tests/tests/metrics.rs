//! The Prometheus exposition of a real agent tracking a real VM, and the
//! migration reports the agent takes over its socket.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent::api::{
    client::{self, ClientError},
    report::{ByEncoding, MigrationReport, Mode, Phase, Role},
};
use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{Vm, VmOptions},
    require_privileged,
    synthetic_images::{FleetLayout, write_fleet},
};

/// The value of the first sample whose line starts with `name_and_labels`.
fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(name_and_labels))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// `promtool check metrics` on `text`: its complaints, or None if promtool is
/// not installed (`cargo xtask setup` installs it).
fn promtool_problems(text: &str) -> Option<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let mut problems = String::from_utf8_lossy(&output.stdout).into_owned();
    problems.push_str(&String::from_utf8_lossy(&output.stderr));
    if !output.status.success() && problems.is_empty() {
        problems = format!("promtool failed: {}", output.status);
    }
    Some(problems)
}

fn assert_promtool_clean(text: &str) {
    match promtool_problems(text) {
        Some(problems) => assert!(
            problems.trim().is_empty(),
            "promtool check metrics:\n{problems}"
        ),
        None if pagefp_tests::privileged::required() => {
            panic!("promtool is missing: run `cargo xtask setup`")
        }
        None => eprintln!("skipped promtool check: promtool not installed"),
    }
}

#[test]
fn metrics_follow_the_vms_and_pass_promtool() {
    require_privileged!("metrics_follow_the_vms_and_pass_promtool");
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    // Served with no VM yet, and a landing page.
    let empty = agent.metrics();
    assert!(empty.contains("pagefp_build_info{version="), "{empty}");
    assert!(empty.contains("process_cpu_seconds_total"), "{empty}");
    assert_promtool_clean(&empty);
    let landing = pagefp_tests::prometheus::http_get(&agent.metrics_addr, "/").unwrap();
    assert!(landing.contains("href=\"/metrics\""), "{landing}");

    let dir = TempDir::new("pagefp-metrics");
    let images = write_fleet(&dir.0, 1, 1024, FleetLayout::default()).unwrap();
    let vm = Vm::start(&dir, &images[0], VmOptions::default());
    let view = agent.wait_all_clean(vm.pid(), Duration::from_secs(60));
    let text = agent.metrics();
    let pid = vm.pid();
    // The page states partition the VM's pages: clean and zero make up all
    // of them once everything is hashed, and zero matches the API's count.
    let state = |s: &str| {
        metric(
            &text,
            &format!("pagefp_vm_pages{{state=\"{s}\",vm=\"{pid}\"}}"),
        )
        .unwrap_or_else(|| panic!("pagefp_vm_pages of state {s} in\n{text}"))
    };
    assert_eq!(
        state("clean") + state("zero"),
        view["pages"].as_f64().unwrap(),
        "{text}"
    );
    assert_eq!(state("zero"), view["zero_pages"].as_f64().unwrap());
    for other in ["unknown", "dirty", "unverified"] {
        assert_eq!(state(other), 0.0, "{other}");
    }
    // (Other VMs of the host may be counted too.)
    assert!(
        metric(&text, "pagefp_vms{dirty_log=\"ring\",tracking=\"tracked\"}") >= Some(1.0),
        "{text}"
    );
    let info = format!(
        "pagefp_vm_info{{comm=\"pagefp-testvmm\",dirty_log=\"ring\",discovery=\"at_creation\",tracking=\"tracked\",vm=\"{pid}\"}} 1"
    );
    assert!(text.contains(&info), "{info} in\n{text}");
    assert!(metric(&text, "pagefp_ebpf_programs_attached").unwrap() >= 5.0);
    assert!(metric(&text, "pagefp_hashed_pages_total").unwrap() >= view["pages"].as_f64().unwrap());
    assert!(metric(&text, "pagefp_hashed_bytes_total").unwrap() > 0.0);
    assert!(metric(&text, "pagefp_hasher_busy_seconds_total").unwrap() > 0.0);
    assert!(
        metric(
            &text,
            &format!("pagefp_vm_hashed_pages_total{{vm=\"{pid}\"}}")
        )
        .unwrap()
            > 0.0
    );
    assert_promtool_clean(&text);

    // Writes show up as dirty events of the VM.
    vm.touch(10, 50, 7);
    let deadline = Instant::now() + Duration::from_secs(30);
    let dirty_events = format!("pagefp_vm_dirty_events_total{{vm=\"{pid}\"}}");
    while metric(&agent.metrics(), &dirty_events).unwrap_or(0.0) < 50.0 {
        assert!(Instant::now() < deadline, "{dirty_events} never reached 50");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The VM's series go away with it.
    vm.exit();
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.metrics().contains(&format!("vm=\"{pid}\"")) {
        assert!(
            Instant::now() < deadline,
            "series of VM {pid} still exported after it exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn report(id: &str, phase: Phase, round: u32, wire_bytes: u64) -> MigrationReport {
    MigrationReport {
        id: id.into(),
        role: Role::Source,
        mode: Mode::TemplatesZstd,
        vm_pid: 4242,
        vm_name: "vmm".into(),
        peer: "127.0.0.1:1".into(),
        phase,
        round,
        started_unix_ms: 1_700_000_000_000,
        elapsed_seconds: f64::from(round),
        mem_bytes: 1 << 30,
        remaining_bytes: (1 << 30) - wire_bytes,
        dirty_pages_per_second: 12.5,
        wire_bytes,
        negotiation_bytes: 64,
        negotiation_seconds: 0.0,
        cpu_seconds: 0.0,
        pages: ByEncoding {
            zero: 10,
            template: 20,
            full: 0,
            zstd: 30,
        },
        bytes: ByEncoding {
            zero: 90,
            template: 180,
            full: 0,
            zstd: wire_bytes,
        },
        templates_agreed: 3,
        downtime_ms: phase.finished().then_some(42.0),
        verified: phase == Phase::Completed,
        error: None,
        catalog_bytes: 0,
        final_pages: 0,
        downtime_parts_ms: Vec::new(),
        timeline: Vec::new(),
        tls: true,
        channel: "TLS 1.3 TLS13_AES_256_GCM_SHA384, peer certificate dest".into(),
        compression: None,
        negotiation: None,
        site: None,
    }
}

fn post(agent: &AgentProcess, body: &[u8]) -> Result<Vec<u8>, ClientError> {
    client::post_json_blocking(&agent.socket, "/v1/migrations", body)
}

fn assert_refused(answer: Result<Vec<u8>, ClientError>, status: u16, words: &str) {
    match answer {
        Err(ClientError::Status {
            status: got,
            message,
        }) => {
            assert_eq!(got.as_u16(), status, "{message}");
            assert!(message.contains(words), "{message:?} should say {words:?}");
        }
        other => panic!("expected HTTP {status}, got {other:?}"),
    }
}

/// Not a test of its own: `migration_reports_over_the_socket` runs the test
/// binary again with this test selected, as a reporting process that exits
/// without a final report.
#[test]
fn helper_process_reports_and_exits() {
    let Ok(socket) = std::env::var("PAGEFP_TEST_REPORT_TO") else {
        return;
    };
    let body = serde_json::to_vec(&report("orphan", Phase::Precopy, 1, 4096)).unwrap();
    client::post_json_blocking(std::path::Path::new(&socket), "/v1/migrations", &body).unwrap();
}

#[test]
fn migration_reports_over_the_socket() {
    require_privileged!("migration_reports_over_the_socket");
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();

    // Malformed bodies: 4xx with a message saying what is wrong.
    assert_refused(post(&agent, b"{not json"), 400, "not a migration report");
    assert_refused(post(&agent, b"{\"id\": \"x\"}"), 400, "missing field");
    let mut bad = serde_json::to_value(report("bad id!", Phase::Precopy, 1, 0)).unwrap();
    assert_refused(post(&agent, bad.to_string().as_bytes()), 400, "needs an id");
    bad["id"] = "neg".into();
    bad["elapsed_seconds"] = (-1.0).into();
    assert_refused(
        post(&agent, bad.to_string().as_bytes()),
        400,
        "elapsed_seconds",
    );
    let huge = vec![b' '; 300 << 10];
    assert_refused(post(&agent, &huge), 413, "at most");
    let listed: Vec<MigrationReport> =
        serde_json::from_slice(&agent.get("/v1/migrations").unwrap()).unwrap();
    assert!(listed.is_empty(), "{listed:?}");

    // A running migration: listed, counted once, with its own gauges.
    for round in [1, 2, 2] {
        let body = serde_json::to_vec(&report("m1", Phase::Precopy, round, 1000)).unwrap();
        post(&agent, &body).unwrap();
    }
    let listed: Vec<MigrationReport> =
        serde_json::from_slice(&agent.get("/v1/migrations").unwrap()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].round, 2);
    let text = agent.metrics();
    let labels = "{id=\"m1\",role=\"source\",vm=\"4242\"}";
    for (name, value) in [
        ("pagefp_migrations_running", 1.0),
        (
            "pagefp_migrations_started_total{mode=\"templates+zstd\",role=\"source\"}",
            1.0,
        ),
        (&format!("pagefp_migration_round{labels}"), 2.0),
        (
            &format!("pagefp_migration_remaining_bytes{labels}"),
            ((1u64 << 30) - 1000) as f64,
        ),
        (
            "pagefp_migration_pages_total{encoding=\"template\",role=\"source\"}",
            20.0,
        ),
        (
            "pagefp_migration_wire_bytes_total{encoding=\"zstd\",role=\"source\"}",
            1000.0,
        ),
    ] {
        assert_eq!(metric(&text, name), Some(value), "{name} in\n{text}");
    }
    assert_promtool_clean(&text);

    // Its end: counted once, observed in the histograms, gauges gone.
    for _ in 0..2 {
        let body = serde_json::to_vec(&report("m1", Phase::Completed, 3, 5000)).unwrap();
        post(&agent, &body).unwrap();
    }
    let text = agent.metrics();
    for (name, value) in [
        ("pagefp_migrations_running", 0.0),
        (
            "pagefp_migrations_completed_total{mode=\"templates+zstd\",role=\"source\"}",
            1.0,
        ),
        (
            "pagefp_migration_duration_seconds_count{mode=\"templates+zstd\"}",
            1.0,
        ),
        (
            "pagefp_migration_downtime_seconds_sum{mode=\"templates+zstd\"}",
            0.042,
        ),
        (
            "pagefp_migration_wire_bytes_total{encoding=\"zstd\",role=\"source\"}",
            5000.0,
        ),
    ] {
        assert_eq!(metric(&text, name), Some(value), "{name} in\n{text}");
    }
    assert!(!text.contains("id=\"m1\""), "{text}");
    assert_promtool_clean(&text);

    // A reporting process that exits without a final report: its migration
    // is failed (the agent knows the poster from the socket's credentials).
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_process_reports_and_exits", "--quiet"])
        .env("PAGEFP_TEST_REPORT_TO", &agent.socket)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let listed: Vec<MigrationReport> =
        serde_json::from_slice(&agent.get("/v1/migrations").unwrap()).unwrap();
    let orphan = listed
        .iter()
        .find(|r| r.id == "orphan")
        .expect("the helper's report");
    assert_eq!(orphan.phase, Phase::Failed, "{orphan:?}");
    assert!(
        orphan
            .error
            .as_deref()
            .is_some_and(|e| e.contains("without a final report")),
        "{orphan:?}"
    );
    let text = agent.metrics();
    assert_eq!(
        metric(
            &text,
            "pagefp_migrations_failed_total{mode=\"templates+zstd\",role=\"source\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("id=\"orphan\""), "{text}");
}

#[test]
fn a_taken_metrics_address_stops_the_agent_with_a_clear_error() {
    require_privileged!("a_taken_metrics_address_stops_the_agent_with_a_clear_error");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("pagefp-metrics-taken");
    std::fs::write(dir.0.join("empty.toml"), "").unwrap();
    let output = Command::new(pagefp_tests::agent_process::agent_binary())
        .arg("agent")
        .arg("--config")
        .arg(dir.0.join("empty.toml"))
        .arg("--socket")
        .arg(dir.0.join("pagefp.sock"))
        .args(["--metrics-addr", &addr])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(&addr) && stderr.contains("--metrics-addr"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("ready"),
        "said ready before failing: {stdout}"
    );
}
