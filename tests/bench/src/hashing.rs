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

/// How fast blake3 hashes pages of a shared memfd mapping (as the agent
/// maps a guest's memory) read three ways, each ÷ blake3 over the same
/// bytes in an ordinary buffer: in place, in place with the next page
/// prefetched (what the agent does), and through a copy into a 4 KiB
/// buffer. The ways take turns on each 8 MiB block, so the machine's
/// swings hit them all alike.
fn read_strategies(memory: &[u8]) -> anyhow::Result<serde_json::Value> {
    const WAYS: usize = 6;
    use nix::sys::{
        memfd::{MFdFlags, memfd_create},
        mman::{MapFlags, ProtFlags, mmap, munmap},
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
            MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
            &memfd,
            0,
        )
    }?;
    // SAFETY: the mapping is `len` bytes long and lives until munmap.
    let mapped_bytes =
        unsafe { std::slice::from_raw_parts(mapped.as_ptr().cast::<u8>(), len.get()) };
    const BLOCK: usize = 2048 * PAGE_SIZE;
    // Seconds per page of each way, summed over the blocks.
    let mut seconds = [0f64; WAYS];
    let mut pages = 0usize;
    let mut staging = vec![0u8; PAGE_SIZE];
    for (block, (plain, shared)) in memory
        .chunks(BLOCK)
        .zip(mapped_bytes.chunks(BLOCK))
        .enumerate()
    {
        let plain: Vec<&[u8]> = plain.chunks_exact(PAGE_SIZE).collect();
        let shared: Vec<&[u8]> = shared.chunks_exact(PAGE_SIZE).collect();
        for turn in 0..WAYS {
            let way = (turn + block) % WAYS;
            let n = shared.len();
            if way == 4 {
                // SAFETY: a range inside the shared mapping made above;
                // `MADV_DONTNEED` drops its page-table entries (the bytes
                // stay in the memfd), so the next reads fault as an
                // agent's first pass over a guest does.
                unsafe {
                    nix::sys::mman::madvise(
                        std::ptr::NonNull::new_unchecked(shared[0].as_ptr() as *mut _),
                        n * PAGE_SIZE,
                        nix::sys::mman::MmapAdvise::MADV_DONTNEED,
                    )
                }?;
            }
            let rate = match way {
                0 => pages_per_sec(n, |i| hash_byte(plain[i])),
                1 => pages_per_sec(n, |i| hash_byte(shared[i])),
                2 => pages_per_sec(n, |i| {
                    if let Some(next) = shared.get(i + 1) {
                        agent::page::prefetch(next);
                    }
                    hash_byte(shared[i])
                }),
                3 => pages_per_sec(n, |i| {
                    staging.copy_from_slice(shared[i]);
                    hash_byte(&staging)
                }),
                // Read from the file, 16 pages per read, then hashed.
                5 => {
                    use std::os::unix::fs::FileExt as _;
                    let base = (block * BLOCK) as u64;
                    let mut batch = vec![0u8; 16 * PAGE_SIZE];
                    pages_per_sec(n, |i| {
                        if i % 16 == 0 {
                            let len = (16.min(n - i)) * PAGE_SIZE;
                            let _ = memfd
                                .read_exact_at(&mut batch[..len], base + (i * PAGE_SIZE) as u64);
                        }
                        let at = (i % 16) * PAGE_SIZE;
                        hash_byte(&batch[at..at + PAGE_SIZE])
                    })
                }
                // As way 2, the page tables just dropped.
                _ => pages_per_sec(n, |i| {
                    if let Some(next) = shared.get(i + 1) {
                        agent::page::prefetch(next);
                    }
                    hash_byte(shared[i])
                }),
            };
            seconds[way] += shared.len() as f64 / rate;
        }
        pages += shared.len();
    }
    // SAFETY: the mapping made above; no slice of it outlives this call.
    unsafe { munmap(mapped, len.get()) }?;
    let rate = |way: usize| pages as f64 / seconds[way];
    Ok(json!({"blake3_pages_per_sec": rate(0),
              "in_place": rate(1) / rate(0),
              "in_place_next_prefetched": rate(2) / rate(0),
              "through_a_copy": rate(3) / rate(0),
              "fresh_mapping_next_prefetched": rate(4) / rate(0),
              "file_reads_of_16_pages": rate(5) / rate(0),
              "what": "blake3 over a shared memfd mapping ÷ over an ordinary buffer, same bytes, the ways taking turns on each 8 MiB block; the agent hashes in place with the next page prefetched"}))
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
    println!(
        "  reading a memfd mapping, ÷ blake3 over a buffer: in place {:.3}, next page prefetched {:.3}, through a copy {:.3}, fresh page tables {:.3}, file reads {:.3}",
        strategies["in_place"].as_f64().unwrap_or(f64::NAN),
        strategies["in_place_next_prefetched"]
            .as_f64()
            .unwrap_or(f64::NAN),
        strategies["through_a_copy"].as_f64().unwrap_or(f64::NAN),
        strategies["fresh_mapping_next_prefetched"]
            .as_f64()
            .unwrap_or(f64::NAN),
        strategies["file_reads_of_16_pages"]
            .as_f64()
            .unwrap_or(f64::NAN),
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
