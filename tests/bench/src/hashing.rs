//! hash_throughput_ratio: the agent's full-pass hashing throughput per core
//! over blake3's own per-page throughput on the same pages.

use std::time::Duration;

use agent::page::PAGE_SIZE;
use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{Vm, VmOptions},
    synthetic_images::fill_content,
};
use serde_json::json;

use super::{Figure, median, spread};

/// blake3 per page over `memory`, one thread: pages per second of the
/// thread's CPU time (as the agent's hash workers count theirs).
pub fn blake3_pages_per_sec(memory: &[u8]) -> f64 {
    let started = agent::clock::thread_cpu_ns();
    let mut sink = 0u8;
    for page in memory.chunks_exact(PAGE_SIZE) {
        sink ^= blake3::hash(page).as_bytes()[0];
    }
    std::hint::black_box(sink);
    let cpu_ns = agent::clock::thread_cpu_ns().saturating_sub(started).max(1);
    (memory.len() / PAGE_SIZE) as f64 / (cpu_ns as f64 / 1e9)
}

/// One agent full pass with one hash thread: pages per busy second.
fn agent_pages_per_sec(
    dir: &TempDir,
    image: &std::path::Path,
    zero_copy: bool,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let agent = AgentProcess::start(&AgentOptions {
        hash_threads: Some(1),
        zero_copy,
        ..AgentOptions::default()
    })?;
    let vm = Vm::start(dir, image, VmOptions::default());
    agent.wait_all_clean(vm.pid(), Duration::from_secs(300));
    let hashing = agent.status()["hashing"].clone();
    let pages = hashing["pages_read"].as_f64().unwrap_or(0.0);
    let busy = hashing["busy_ns"].as_f64().unwrap_or(f64::MAX) / 1e9;
    Ok((pages / busy, hashing))
}

pub fn measure(pages: usize, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let dir = TempDir::new("pagefp-bench-hash");
    // Distinct non-zero pages: no zero-page shortcut flatters the agent.
    let mut memory = vec![0u8; pages * PAGE_SIZE];
    for (i, page) in memory.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_content(page, i as u64 + 1);
    }
    let image = dir.0.join("hash.img");
    std::fs::write(&image, &memory)?;
    let (mut mapped, mut copied) = (Vec::new(), Vec::new());
    let mut runs = Vec::new();
    for round in 0..rounds {
        let baseline = blake3_pages_per_sec(&memory);
        let (agent_mapped, stats) = agent_pages_per_sec(&dir, &image, true)?;
        let baseline_again = blake3_pages_per_sec(&memory);
        let (agent_copied, _) = agent_pages_per_sec(&dir, &image, false)?;
        let reference = (baseline + baseline_again) / 2.0;
        mapped.push(agent_mapped / reference);
        copied.push(agent_copied / reference);
        println!(
            "  hashing round {round}: blake3 {reference:.0} pages/s, agent {agent_mapped:.0} (mapped), {agent_copied:.0} (copied) pages/s per core"
        );
        runs.push(
            json!({"blake3_pages_per_sec": reference, "agent_mapped_pages_per_sec": agent_mapped,
                         "agent_copied_pages_per_sec": agent_copied, "agent_hashing": stats}),
        );
    }
    let mapped_spread = spread(&mapped);
    let copied_ratio = median(&mut copied);
    Ok(vec![
        Figure::at_least(
            "hash_throughput_ratio",
            median(&mut mapped),
            0.9,
            "ratio",
            json!({"guest_pages": pages, "rounds": runs, "mode": "sealed memfd mapped (zero copy)",
                   "ratio": mapped_spread, "order": "blake3, agent, blake3, agent (copied) per round",
                   "copied_ratio": copied_ratio}),
        ),
        Figure::at_least(
            "hash_throughput_ratio_copied",
            copied_ratio,
            0.0,
            "ratio",
            json!({"note": "process_vm_readv path, for VMMs with anonymous guest memory; informational"}),
        ),
    ])
}
