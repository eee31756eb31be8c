//! hash_throughput_ratio: the agent's full-pass hashing throughput per core
//! over blake3's own per-page throughput on the same pages.

use std::{num::NonZeroUsize, time::Duration};

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
    let pages: Vec<&[u8]> = memory.chunks_exact(PAGE_SIZE).collect();
    pages_per_sec(pages.len(), |index| hash_byte(pages[index]))
}

/// A byte of the page's blake3 (for a sink the compiler cannot drop).
fn hash_byte(page: &[u8]) -> u8 {
    blake3::hash(page).as_bytes()[0]
}

/// `hash` of page 0, 1, ... `pages - 1`: pages per second of the thread's
/// CPU time.
fn pages_per_sec(pages: usize, mut hash: impl FnMut(usize) -> u8) -> f64 {
    let started = agent::clock::thread_cpu_ns();
    let mut sink = 0u8;
    for index in 0..pages {
        sink ^= hash(index);
    }
    std::hint::black_box(sink);
    let cpu_ns = agent::clock::thread_cpu_ns().saturating_sub(started).max(1);
    pages as f64 / (cpu_ns as f64 / 1e9)
}

/// Asks the CPU to start loading `page` into its caches, one prefetch per
/// cache line, without waiting (a way the agent tried and dropped: see
/// [`read_strategies`]).
fn prefetch(page: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in page.chunks(64) {
        // SAFETY: a prefetch only hints the cache: it never faults and
        // changes no byte, whatever the address (here: inside `page`).
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = page;
}

/// The ways [`read_strategies`] reads a memfd's pages, in its report's
/// words.
const WAYS: [&str; 6] = [
    "plain_buffer",
    "in_place",
    "in_place_next_prefetched",
    "fresh_mapping",
    "fresh_mapping_next_prefetched",
    "file_reads_of_16_pages",
];

/// How fast blake3 hashes the pages of a shared memfd mapping (as the agent
/// maps a guest's memory), read several ways, each ÷ blake3 over the same
/// bytes in an ordinary buffer. Each way is a whole pass over `memory`
/// (larger than the caches, as a guest's memory is), the ways taking turns
/// in a rotating order over `ROUNDS` rounds so the machine's swings hit
/// them all alike. "Fresh" ways drop the mapping's page-table entries first,
/// as a first pass over a guest finds them.
fn read_strategies(memory: &[u8]) -> anyhow::Result<serde_json::Value> {
    const ROUNDS: usize = 2;
    use std::os::unix::fs::FileExt as _;

    use nix::sys::{
        memfd::{MFdFlags, memfd_create},
        mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap, munmap},
    };
    let memfd = std::fs::File::from(memfd_create("pagefp-bench-hash", MFdFlags::empty())?);
    std::io::Write::write_all(&mut &memfd, memory)?;
    let len = NonZeroUsize::new(memory.len()).ok_or_else(|| anyhow::anyhow!("no memory"))?;
    // SAFETY: a fresh read-only shared mapping of a memfd this function
    // owns and nothing else writes; unmapped below before it returns.
    let mapped = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            &memfd,
            0,
        )
    }?;
    // SAFETY: the mapping is `len` bytes long and lives until munmap.
    let shared = unsafe { std::slice::from_raw_parts(mapped.as_ptr().cast::<u8>(), len.get()) };
    let plain: Vec<&[u8]> = memory.chunks_exact(PAGE_SIZE).collect();
    let pages: Vec<&[u8]> = shared.chunks_exact(PAGE_SIZE).collect();
    let n = pages.len();
    let in_place_prefetched = |i: usize| {
        if let Some(next) = pages.get(i + 1) {
            prefetch(next);
        }
        hash_byte(pages[i])
    };
    let mut batch = vec![0u8; 16 * PAGE_SIZE];
    let mut seconds = [0f64; WAYS.len()];
    for round in 0..ROUNDS {
        for turn in 0..WAYS.len() {
            let way = (turn + round) % WAYS.len();
            // Page tables filled (ways 1, 2) or dropped (3, 4) beforehand,
            // not timed. `MADV_DONTNEED` on a shared mapping only unmaps:
            // the bytes stay in the memfd.
            let advice = match way {
                1 | 2 => Some(MmapAdvise::MADV_POPULATE_READ),
                3 | 4 => Some(MmapAdvise::MADV_DONTNEED),
                _ => None,
            };
            if let Some(advice) = advice {
                // SAFETY: the whole of the mapping made above; either
                // advice changes no byte of it.
                unsafe { madvise(mapped, len.get(), advice) }?;
            }
            let rate = match way {
                0 => pages_per_sec(n, |i| hash_byte(plain[i])),
                1 | 3 => pages_per_sec(n, |i| hash_byte(pages[i])),
                2 | 4 => pages_per_sec(n, in_place_prefetched),
                _ => pages_per_sec(n, |i| {
                    if i % 16 == 0 {
                        let len = 16.min(n - i) * PAGE_SIZE;
                        let _ = memfd.read_exact_at(&mut batch[..len], (i * PAGE_SIZE) as u64);
                    }
                    let at = (i % 16) * PAGE_SIZE;
                    hash_byte(&batch[at..at + PAGE_SIZE])
                }),
            };
            seconds[way] += n as f64 / rate;
        }
    }
    // SAFETY: the mapping made above; no slice of it outlives this call.
    unsafe { munmap(mapped, len.get()) }?;
    let reference = seconds[0];
    let mut report = serde_json::Map::new();
    report.insert(
        "blake3_pages_per_sec".into(),
        json!((n * ROUNDS) as f64 / reference),
    );
    for (way, name) in WAYS.iter().enumerate().skip(1) {
        report.insert((*name).into(), json!(reference / seconds[way]));
    }
    report.insert(
        "what".into(),
        json!(format!(
            "blake3 over a shared memfd mapping ÷ over an ordinary buffer, same bytes, each way a whole pass \
             over {} MiB (more than the caches hold), the ways taking turns over {ROUNDS} rounds; \
             fresh ways start with the page tables dropped, as an agent's first pass over a guest; \
             the agent hashes in place without prefetching",
            memory.len() >> 20
        )),
    );
    Ok(serde_json::Value::Object(report))
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
    let strategies = read_strategies(&memory)?;
    let ratios: Vec<String> = WAYS[1..]
        .iter()
        .map(|way| format!("{way} {:.3}", strategies[*way].as_f64().unwrap_or(f64::NAN)))
        .collect();
    println!(
        "  reading a memfd mapping, ÷ blake3 over a buffer: {}",
        ratios.join(", ")
    );
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
                   "copied_ratio": copied_ratio, "read_strategies": strategies}),
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
