//! rescan_cost_ratio: what rescanning an untracked VM (QEMU outside a
//! migration) costs with xxh3 change detection, over blake3 alone: busy
//! seconds of the hash worker per GiB rescanned, on a guest whose pages do
//! not change, after the first pass. Rounds alternate the two agents.

use std::time::{Duration, Instant};

use agent::page::PAGE_SIZE;
use anyhow::bail;
use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{Vm, VmOptions},
    synthetic_images::fill_content,
};
use serde_json::json;

use super::{Figure, median, spread};

/// Rescan counters of the agent's hash pool: (pages, unchanged, busy ns).
fn counters(agent: &AgentProcess) -> (u64, u64, u64) {
    let hashing = agent.status()["hashing"].clone();
    let get = |name: &str| hashing[name].as_u64().unwrap_or(0);
    (
        get("rescan_pages"),
        get("rescan_unchanged"),
        get("rescan_busy_ns"),
    )
}

/// Waits until the agent has rescanned at least `pages` pages.
fn wait_rescanned(agent: &AgentProcess, pages: u64) -> anyhow::Result<(u64, u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let now = counters(agent);
        if now.0 >= pages {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!("only {} of {pages} pages rescanned in 300 s", now.0);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One agent rescanning one untracked VM of `image` (`pages` pages):
/// busy seconds per GiB over passes 2 and 3, and the share of unchanged
/// pages seen.
fn one_agent(
    dir: &TempDir,
    image: &std::path::Path,
    pages: u64,
    change_detection: bool,
) -> anyhow::Result<(f64, f64)> {
    let mut extra = vec!["--rescan-pages-per-sec".to_owned(), "2000000".to_owned()];
    if !change_detection {
        extra.push("--no-change-detection".into());
    }
    let agent = AgentProcess::start(&AgentOptions {
        hash_threads: Some(1),
        extra,
        ..AgentOptions::default()
    })?;
    let _vm = Vm::start(
        dir,
        image,
        VmOptions {
            dirty: "none",
            ..VmOptions::default()
        },
    );
    let first = wait_rescanned(&agent, pages)?;
    let last = wait_rescanned(&agent, first.0 + 2 * pages)?;
    let rescanned = (last.0 - first.0) as f64;
    let gib = rescanned * PAGE_SIZE as f64 / f64::from(1u32 << 30);
    let seconds = (last.2 - first.2) as f64 / 1e9;
    Ok((seconds / gib, (last.1 - first.1) as f64 / rescanned))
}

pub fn measure(pages: usize, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let dir = TempDir::new("pagefp-bench-rescan");
    // Distinct non-zero pages: no zero-page shortcut.
    let mut memory = vec![0u8; pages * PAGE_SIZE];
    for (i, page) in memory.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_content(page, i as u64 + 1);
    }
    let image = dir.0.join("rescan.img");
    std::fs::write(&image, &memory)?;
    drop(memory);
    let (mut ratios, mut with, mut without, mut unchanged) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (detected, share) = one_agent(&dir, &image, pages as u64, true)?;
        let (blake3_only, _) = one_agent(&dir, &image, pages as u64, false)?;
        println!(
            "  rescan round {round}: {detected:.3} s/GiB with change detection ({:.1}% unchanged), {blake3_only:.3} s/GiB with blake3 alone",
            share * 100.0
        );
        ratios.push(detected / blake3_only);
        with.push(detected);
        without.push(blake3_only);
        unchanged.push(share);
    }
    Ok(vec![Figure::at_most(
        "rescan_cost_ratio",
        median(&mut ratios.clone()),
        0.35,
        "ratio",
        json!({
            "guest_pages": pages,
            "note": "hash-worker busy seconds per GiB rescanned, passes 2 and 3 of an untracked VM whose pages do not change; rounds alternate the agents",
            "ratio": spread(&ratios),
            "seconds_per_gib_change_detection": spread(&with),
            "seconds_per_gib_blake3_alone": spread(&without),
            "unchanged_share": spread(&unchanged),
        }),
    )])
}
