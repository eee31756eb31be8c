//! rehash_per_dirty_page: pages the agent reads per page the guest dirtied,
//! in steady state.

use std::time::Duration;

use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{Vm, VmOptions},
    synthetic_images::{FleetLayout, write_fleet},
};
use serde_json::json;

use super::Figure;

pub fn measure(iterations: u32) -> anyhow::Result<Vec<Figure>> {
    const PAGES: u32 = 32768;
    let dir = TempDir::new("pagefp-bench-rehash");
    let images = write_fleet(&dir.0, 1, PAGES as usize, FleetLayout::default())?;
    let agent = AgentProcess::start(&AgentOptions::default())?;
    let vm = Vm::start(&dir, &images[0], VmOptions::default());
    agent.wait_all_clean(vm.pid(), Duration::from_secs(120));
    let read_before = agent.status()["hashing"]["pages_read"].as_u64().unwrap();
    let mut dirtied = 0u64;
    for i in 0..iterations {
        // 1024 distinct pages spread over all of memory, a different set each time.
        let first = i % 32;
        vm.run(json!([{"op": "stride", "first": first, "count": 1024, "step": 32, "value": i}]));
        dirtied += 1024;
    }
    let view = agent.wait_all_clean(vm.pid(), Duration::from_secs(120));
    let read = agent.status()["hashing"]["pages_read"].as_u64().unwrap() - read_before;
    let ratio = read as f64 / dirtied as f64;
    println!("  steady state: {dirtied} pages dirtied, {read} pages read by the agent: {ratio:.3}");
    Ok(vec![Figure::at_most(
        "rehash_per_dirty_page",
        ratio,
        1.05,
        "pages read / page dirtied",
        json!({"guest_pages": PAGES, "iterations": iterations, "pages_dirtied": dirtied, "pages_read": read,
               "pages_rehashed": view["stats"]["pages_rehashed"]}),
    )])
}
