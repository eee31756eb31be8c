//! Another process's guest memory, as a migration handles it: the source's
//! regions read through the agent's [`GuestMapping`] (the VMM's sealed
//! memfds, via `/proc/PID/map_files`) and the destination's written through
//! it. Root only, as `/proc/PID/map_files` is.

use agent::guest_memory::GuestMapping;
use anyhow::{Context as _, bail};

use super::MemoryRegion;

/// Maps one region that a VMM's `info` reported: read-only (its memfd must
/// be sealed, as the test VMM's are) or read-write.
pub fn map_region(pid: u32, region: &MemoryRegion, writable: bool) -> anyhow::Result<GuestMapping> {
    let what = || format!("guest memory slot {} of VMM pid {pid}", region.slot);
    if writable {
        GuestMapping::open_writable(pid, region.uaddr, region.size).with_context(what)
    } else {
        GuestMapping::open_sealed(pid, region.uaddr, region.size)
            .with_context(what)?
            .with_context(|| format!("{} is not in a sealed memfd", what()))
    }
}

/// Copies every region of `source` (process `source_pid`) into the region
/// of `dest` (process `dest_pid`) with the same slot; both lists come from
/// `info`. Returns the bytes copied.
pub fn copy_regions(
    source_pid: u32,
    source: &[MemoryRegion],
    dest_pid: u32,
    dest: &[MemoryRegion],
) -> anyhow::Result<u64> {
    let key = |r: &MemoryRegion| (r.slot, r.gpa, r.size, r.read_only);
    let mut theirs: Vec<_> = source.iter().map(key).collect();
    let mut mine: Vec<_> = dest.iter().map(key).collect();
    theirs.sort_unstable();
    mine.sort_unstable();
    if theirs != mine {
        bail!(
            "the VMMs' memory layouts differ: (slot, gpa, size, read_only) {theirs:x?} vs {mine:x?}; \
             start the destination with the source's --mem-mib and --slots"
        );
    }
    let mut copied = 0;
    for region in source {
        let target = dest
            .iter()
            .find(|d| d.slot == region.slot)
            .expect("same slots");
        let from = map_region(source_pid, region, false)?;
        let mut to = map_region(dest_pid, target, true)?;
        to.bytes_mut()
            .context("the destination was mapped read-only")?
            .copy_from_slice(from.bytes());
        copied += region.size;
    }
    Ok(copied)
}
