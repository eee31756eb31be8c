//! agent_bytes_per_guest_page: the agent's own memory (anonymous RSS: its
//! heap, not the guest memory it maps) per tracked guest page.

use std::time::Duration;

use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{Vm, VmOptions},
    synthetic_images::{FleetLayout, write_fleet},
};
use serde_json::json;

use super::Figure;

fn bytes_per_page(
    layout: FleetLayout,
    vms: usize,
    pages: usize,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let dir = TempDir::new("pagefp-bench-memory");
    let images = write_fleet(&dir.0, vms, pages, layout)?;
    let agent = AgentProcess::start(&AgentOptions::default())?;
    // Warm up with one small VM so fixed costs (hash buffers, thread arenas,
    // runtime) are in the baseline: the figure is the cost per added page.
    let warm_image = dir.0.join("warm.img");
    std::fs::write(&warm_image, vec![1u8; 1 << 20])?;
    let warm = Vm::start(&dir, &warm_image, VmOptions::default());
    agent.wait_all_clean(warm.pid(), Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    let idle = agent.rss_anon_bytes();
    let fleet: Vec<Vm> = images
        .iter()
        .map(|image| Vm::start(&dir, image, VmOptions::default()))
        .collect();
    let mut tracked = 0u64;
    for vm in &fleet {
        tracked += agent.wait_all_clean(vm.pid(), Duration::from_secs(300))["pages"]
            .as_u64()
            .unwrap();
    }
    // Let the agent release what finished jobs freed.
    std::thread::sleep(Duration::from_millis(1500));
    let loaded = agent.rss_anon_bytes();
    let per_page = loaded.saturating_sub(idle) as f64 / tracked as f64;
    let contents = agent.status()["distinct_contents"].clone();
    Ok((
        per_page,
        json!({"vms": vms, "tracked_pages": tracked, "rss_anon_idle": idle, "rss_anon_loaded": loaded,
                         "distinct_contents": contents}),
    ))
}

pub fn measure(vms: usize, pages: usize) -> anyhow::Result<Vec<Figure>> {
    let (fleet, fleet_details) = bytes_per_page(FleetLayout::default(), vms, pages)?;
    println!("  agent memory per guest page, fleet images: {fleet:.1} bytes");
    let unique = FleetLayout {
        os_pct: 0,
        library_pct: 0,
        zero_pct: 0,
    };
    let (worst, worst_details) = bytes_per_page(unique, vms, pages)?;
    println!("  agent memory per guest page, every page distinct: {worst:.1} bytes");
    Ok(vec![
        Figure::at_most(
            "agent_bytes_per_guest_page",
            fleet,
            // Issue 12's target.
            48.0,
            "bytes",
            json!({"images": "fleet: 40% OS pages shared by all VMs, 20% shared by half, 20% zero, 20% unique",
                   "measure": fleet_details}),
        ),
        Figure::at_most(
            "agent_bytes_per_guest_page_all_distinct",
            worst,
            f64::INFINITY,
            "bytes",
            json!({"images": "every page distinct (worst case)", "measure": worst_details, "note": "informational"}),
        ),
    ])
}
