//! `--only throughput` (target/pagefp-bench/throughput.json): how fast
//! pagefp's native migration goes when the link is not the limit (a veth
//! pair, no shaping, no delay), next to what this machine's hashing and
//! copying allow, so the distance to the physical limit shows.
//!
//! Per mode, medians over the guests: guest GiB migrated per second of the
//! whole migration, and per CPU second of the sending process (the cores it
//! used; for `qemu-proxy`, of the send proxy). Beside them: blake3 over
//! 4 KiB pages and memcpy, one core each. `qemu` is QEMU's own migration
//! (TCG) and `qemu-proxy` the same through the proxies, which parse and
//! deduplicate QEMU's stream at whatever rate QEMU sends it.

use std::time::Instant;

use pagefp_tests::{guest_images::GuestImage, netns::LinkSpec};
use serde::Serialize;

use crate::migration::{self, Run, Settings};

#[derive(Debug, Serialize)]
pub struct ModeThroughput {
    pub mode: String,
    pub vms: usize,
    /// Guest GiB per second of migration (median, and the range).
    pub gib_per_second: f64,
    pub gib_per_second_range: [f64; 2],
    /// Guest GiB per CPU second of the sender.
    pub gib_per_sender_cpu_second: f64,
    pub gib_per_sender_cpu_second_range: [f64; 2],
    pub all_verified: bool,
}

#[derive(Debug, Serialize)]
pub struct ThroughputReport {
    pub machine: String,
    pub modes: Vec<ModeThroughput>,
    /// One core: blake3 over distinct 4 KiB pages, GiB/s.
    pub blake3_gib_per_second: f64,
    /// One core: memcpy of 4 KiB pages into a buffer, GiB/s.
    pub memcpy_gib_per_second: f64,
    pub targets: serde_json::Value,
    pub runs: Vec<Run>,
}

pub fn run(images: &[GuestImage], migrate: Vec<String>) -> anyhow::Result<ThroughputReport> {
    let settings = Settings {
        links: vec![LinkSpec::UNLIMITED],
        modes: [
            "baseline",
            "templates",
            "templates@plaintext",
            "templates+zstd",
            "qemu",
            "qemu-proxy",
        ]
        .map(String::from)
        .to_vec(),
        migrate,
        ..Settings::default()
    };
    let report = migration::run(images, &settings)?;
    let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
    let modes: Vec<ModeThroughput> = settings
        .modes
        .iter()
        .filter_map(|mode| {
            let runs: Vec<&Run> = report
                .runs
                .iter()
                .filter(|r| &r.mode == mode && r.error.is_none())
                .collect();
            if runs.is_empty() {
                return None;
            }
            let mut rate: Vec<f64> = runs
                .iter()
                .map(|r| gib(r.mem_bytes) / r.total_seconds.max(1e-9))
                .collect();
            // QEMU's own sender is not measured.
            let mut per_core: Vec<f64> = runs
                .iter()
                .filter(|r| r.sender_cpu_seconds > 0.0)
                .map(|r| gib(r.mem_bytes) / r.sender_cpu_seconds)
                .collect();
            let range = |values: &[f64]| {
                [
                    values.iter().copied().fold(f64::INFINITY, f64::min),
                    values.iter().copied().fold(0.0, f64::max),
                ]
            };
            // 0 where the sender's CPU is not measured (QEMU's own).
            let (per_core_median, per_core_range) = if per_core.is_empty() {
                (0.0, [0.0, 0.0])
            } else {
                let spread = range(&per_core);
                (crate::median(&mut per_core), spread)
            };
            Some(ModeThroughput {
                mode: mode.clone(),
                vms: runs.len(),
                gib_per_second_range: range(&rate),
                gib_per_sender_cpu_second_range: per_core_range,
                gib_per_second: crate::median(&mut rate),
                gib_per_sender_cpu_second: per_core_median,
                all_verified: runs.iter().all(|r| r.verified),
            })
        })
        .collect();
    let (blake3_rate, memcpy_rate) = local_rates();
    let templates = modes
        .iter()
        .find(|m| m.mode == "templates")
        .map(|m| m.gib_per_sender_cpu_second);
    Ok(ThroughputReport {
        machine: crate::machine(),
        targets: serde_json::json!({
            "templates_gib_per_sender_core_min": 1.0,
            "templates_gib_per_sender_core": templates,
            "met": templates.is_some_and(|t| t >= 1.0),
        }),
        modes,
        blake3_gib_per_second: blake3_rate,
        memcpy_gib_per_second: memcpy_rate,
        runs: report.runs,
    })
}

/// blake3 and memcpy over 256 MiB of distinct pages, one core, best of 3.
fn local_rates() -> (f64, f64) {
    const PAGES: usize = 65_536;
    let memory: Vec<u8> = (0..PAGES * 4096)
        .map(|i| (i / 4096) as u8 ^ (i as u8))
        .collect();
    let gib = (PAGES * 4096) as f64 / f64::from(1u32 << 30);
    let mut out = vec![0u8; 4096];
    let (mut hash_best, mut copy_best) = (f64::INFINITY, f64::INFINITY);
    let mut sink = 0u8;
    for _ in 0..3 {
        let started = Instant::now();
        for page in memory.chunks_exact(4096) {
            sink ^= blake3::hash(page).as_bytes()[0];
        }
        hash_best = hash_best.min(started.elapsed().as_secs_f64());
        let started = Instant::now();
        for page in memory.chunks_exact(4096) {
            out.copy_from_slice(std::hint::black_box(page));
            sink ^= std::hint::black_box(&out)[17];
        }
        copy_best = copy_best.min(started.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (gib / hash_best, gib / copy_best)
}

/// Writes the report as JSON.
pub fn write(report: &ThroughputReport, path: &std::path::Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(report)?)?;
    Ok(())
}
