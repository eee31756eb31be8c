//! guest_dirty_rate_ratio: guest pages written per second with the agent
//! attached over without it, on the same VM, alternating; and the cost of
//! each eBPF program the agent can put on dirty-ring pushes (its hot path).

use std::time::Duration;

use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{Vm, VmOptions},
    synthetic_images::{FleetLayout, write_fleet},
};
use serde_json::{Value, json};

use super::{Figure, median, spread};

/// CPU time (ns) all threads of process `pid` have run, from the
/// scheduler's own accounting (`/proc/PID/task/*/schedstat`).
fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The guest's rate running `ops` in a loop for `seconds`: pages per
/// second, and pages per second of the VMM's CPU time (the eBPF programs
/// run in its vCPU thread, and count there; time the machine gave to
/// others does not).
#[derive(Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: f64,
}

fn guest_rate(vm: &Vm, ops: &Value, seconds: f64) -> Rate {
    let cpu_before = process_cpu_ns(vm.pid());
    vm.start_loop(ops.clone());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let report = vm.stop_loop();
    let cpu_seconds = process_cpu_ns(vm.pid()).saturating_sub(cpu_before) as f64 / 1e9;
    let pages = report["pages_written"].as_f64().unwrap();
    Rate {
        wall: pages / report["seconds"].as_f64().unwrap(),
        cpu: pages / cpu_seconds.max(1e-9),
    }
}

/// Guest rates of `rounds` rounds, each: without an agent, then with each
/// agent of `agents` (name, extra flags) in turn.
struct Rates {
    without: Vec<Rate>,
    with: Vec<Vec<Rate>>,
}

fn rates(
    vm: &Vm,
    ops: &Value,
    rounds: usize,
    seconds: f64,
    agents: &[(&str, &[&str])],
) -> anyhow::Result<Rates> {
    let mut rates = Rates {
        without: Vec::new(),
        with: vec![Vec::new(); agents.len()],
    };
    for _ in 0..rounds {
        rates.without.push(guest_rate(vm, ops, seconds));
        for (i, (_, flags)) in agents.iter().enumerate() {
            let agent = AgentProcess::start(&AgentOptions {
                extra: flags.iter().map(|f| f.to_string()).collect(),
                ..AgentOptions::default()
            })?;
            // The VM started before this agent: it is adopted at its next
            // slot registration and synced at its next ring reset.
            vm.reregister();
            vm.touch(0, 1, 1);
            agent.wait_all_clean(vm.pid(), Duration::from_secs(120));
            rates.with[i].push(guest_rate(vm, ops, seconds));
        }
    }
    Ok(rates)
}

impl Rates {
    /// Per round: with agent `i` ÷ without, pages per wall-clock second.
    fn ratios(&self, i: usize) -> Vec<f64> {
        self.per_round(i, |with, without| with.wall / without.wall)
    }

    /// Per round: with agent `i` ÷ without, pages per VMM CPU second.
    fn cpu_ratios(&self, i: usize) -> Vec<f64> {
        self.per_round(i, |with, without| with.cpu / without.cpu)
    }

    /// Per round: VMM CPU nanoseconds agent `i` adds to each of
    /// `events_per_page` events the guest's page writes make.
    fn ns_per_event(&self, i: usize, events_per_page: f64) -> Vec<f64> {
        self.per_round(i, |with, without| {
            (1.0 / with.cpu - 1.0 / without.cpu) * 1e9 / events_per_page
        })
    }

    fn per_round(&self, i: usize, f: impl Fn(&Rate, &Rate) -> f64) -> Vec<f64> {
        self.with[i]
            .iter()
            .zip(&self.without)
            .map(|(with, without)| f(with, without))
            .collect()
    }

    fn runs(&self, agents: &[(&str, &[&str])]) -> Value {
        let wall = |rates: &[Rate]| rates.iter().map(|r| r.wall).collect::<Vec<_>>();
        let cpu = |rates: &[Rate]| rates.iter().map(|r| r.cpu).collect::<Vec<_>>();
        let mut by_agent = serde_json::Map::new();
        for (i, (name, _)) in agents.iter().enumerate() {
            by_agent.insert(
                (*name).into(),
                json!({"pages_per_sec": wall(&self.with[i]), "pages_per_cpu_sec": cpu(&self.with[i]),
                       "ratio_to_without": spread(&self.ratios(i)),
                       "cpu_ratio_to_without": spread(&self.cpu_ratios(i))}),
            );
        }
        json!({"order": "per round: without, then each agent",
               "without_pages_per_sec": wall(&self.without),
               "without_pages_per_cpu_sec": cpu(&self.without), "with_agent": by_agent})
    }
}

/// The agent as it runs by default, then forced onto each push program.
const AGENTS: [(&str, &[&str]); 4] = [
    ("default", &[]),
    ("tp_btf", &["--ring-push-program", "btf"]),
    ("raw_tracepoint", &["--ring-push-program", "raw"]),
    ("tracepoint", &["--ring-push-program", "tracepoint"]),
];

/// Dirty-ring pushes per page of the whole-page workload under the
/// instruction emulator (one per dword written, and two more).
const PUSHES_PER_WHOLE_PAGE: f64 = 1026.0;

pub fn measure(rounds: usize, seconds: f64) -> anyhow::Result<Vec<Figure>> {
    let dir = TempDir::new("pagefp-bench-dirty");
    let images = write_fleet(&dir.0, 1, 16384, FleetLayout::default())?;
    let vm = Vm::start(&dir, &images[0], VmOptions::default());
    // One write per page: one dirty event per page, as on hardware.
    let touch = json!([{"op": "touch", "first": 0, "count": 16384, "value": 1}]);
    let touch_rates = rates(&vm, &touch, rounds, seconds, &AGENTS[..1])?;
    let touch_ratio = median(&mut touch_rates.ratios(0));
    let touch_cpu_ratio = median(&mut touch_rates.cpu_ratios(0));
    println!(
        "  guest dirty rate with/without agent (touch): {touch_ratio:.3} per second, {touch_cpu_ratio:.3} per VMM CPU second"
    );
    // Whole-page writes: under the instruction emulator each dword written
    // is a dirty-ring push, so about a thousand eBPF events per page: the
    // push program's own cost shows.
    let full = json!([{"op": "random", "first": 0, "count": 2048, "seed": 3}]);
    let full_rates = rates(&vm, &full, rounds, seconds, &AGENTS)?;
    let full_ratio = median(&mut full_rates.ratios(0));
    println!("  guest dirty rate with/without agent (whole pages): {full_ratio:.3}");
    let ns = |i: usize| full_rates.ns_per_event(i, PUSHES_PER_WHOLE_PAGE);
    let per_program: Vec<Value> = AGENTS[1..]
        .iter()
        .enumerate()
        .map(|(i, (name, _))| json!({"program": name, "ns_per_push": spread(&ns(i + 1))}))
        .collect();
    // Per round, the BTF-typed program's added cost ÷ the classic one's.
    let hot_path: Vec<f64> = ns(1)
        .iter()
        .zip(ns(3))
        .map(|(btf, classic)| btf / classic)
        .collect();
    let hot_path_ratio = median(&mut hot_path.clone());
    println!(
        "  ring push cost per event, tp_btf ÷ classic tracepoint: {hot_path_ratio:.3} ({})",
        per_program
            .iter()
            .map(|p| format!(
                "{} {:.0} ns",
                p["program"].as_str().unwrap(),
                p["ns_per_push"]["median"]
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(vec![
        Figure::at_least(
            "guest_dirty_rate_ratio",
            touch_ratio,
            0.97,
            "ratio",
            json!({"workload": "touch: one write per page, 16384 pages per iteration, harvest per iteration",
                   "seconds_per_run": seconds, "ratio": spread(&touch_rates.ratios(0)),
                   "runs": touch_rates.runs(&AGENTS[..1])}),
        ),
        Figure::at_least(
            "guest_dirty_cpu_ratio",
            touch_cpu_ratio,
            0.0,
            "ratio",
            json!({"what": "the same runs, pages per second of the VMM's own CPU time (its threads' schedstat): what the eBPF programs cost the guest, without the machine's other load",
                   "ratio": spread(&touch_rates.cpu_ratios(0)), "note": "informational"}),
        ),
        Figure::at_least(
            "guest_dirty_rate_ratio_whole_pages",
            full_ratio,
            0.0,
            "ratio",
            json!({"workload": "random: whole-page writes; the emulator pushes 1026 ring entries per page (hardware: 1)",
                   "ratio": spread(&full_rates.ratios(0)), "runs": full_rates.runs(&AGENTS),
                   "note": "informational"}),
        ),
        Figure::at_most(
            "ring_push_cost_ratio",
            hot_path_ratio,
            1.0,
            "ratio",
            json!({"what": "VMM CPU time the agent adds per dirty-ring push (whole-page workload, 1026 pushes per page), tp_btf program ÷ classic tracepoint program, per round",
                   "ratio": spread(&hot_path), "per_program": per_program,
                   "note": "the agent's user space is the same in every run; only the push program differs"}),
        ),
    ])
}
