//! The Prometheus exposition of a real agent tracking a real VM.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{Vm, VmOptions},
    images::{FleetLayout, write_fleet},
    require_privileged,
};

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

#[test]
fn metrics_follow_the_vms_and_pass_promtool() {
    require_privileged!("metrics_follow_the_vms_and_pass_promtool");
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    // Served with no VM yet.
    let empty = agent.metrics();
    assert!(empty.contains("pagefp_build_info{version="), "{empty}");

    let dir = TempDir::new("pagefp-metrics");
    let images = write_fleet(&dir.0, 1, 1024, FleetLayout::default()).unwrap();
    let vm = Vm::start(&dir, &images[0], VmOptions::default());
    let view = agent.wait_all_clean(vm.pid(), Duration::from_secs(60));
    let text = agent.metrics();
    let label = format!("pagefp_vm_pages{{state=\"clean\",vm=\"{}\"}}", vm.pid());
    assert_eq!(
        metric(&text, &label),
        view["pages"].as_f64(),
        "{label} in\n{text}"
    );
    assert!(metric(&text, "pagefp_ebpf_programs_attached").unwrap() >= 5.0);
    assert!(metric(&text, "pagefp_pages_hashed_total{reason=\"full_pass\"}").unwrap() > 0.0);
    match promtool_problems(&text) {
        Some(problems) => assert!(
            problems.trim().is_empty(),
            "promtool check metrics:\n{problems}"
        ),
        None if pagefp_tests::privileged::required() => {
            panic!("promtool is missing: run `cargo xtask setup`")
        }
        None => eprintln!("skipped promtool check: promtool not installed"),
    }

    // The VM's series go away with it.
    let pid = vm.pid();
    vm.exit();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while agent.metrics().contains(&format!("vm=\"{pid}\"")) {
        assert!(
            std::time::Instant::now() < deadline,
            "series of VM {pid} still exported after it exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
