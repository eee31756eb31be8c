//! Guest memory images made by the tests: a fleet of VMs that share a known
//! part of their memory, like VMs running the same OS and software.
//!
//! Each page of each image is one of:
//! - an "OS" page: same content in every VM (same place too);
//! - a "library" page: same content in the even-numbered VMs only;
//! - a zero page;
//! - a page unique to its VM (some repeated a few times inside that VM).
//!
//! Real Linux guests are [`crate::guest_images`] (built by `tests/images`);
//! these are exact and cheap, so tests can compute their ground truth.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use agent::page::PAGE_SIZE;

/// The share of each kind of page, in percent of the image.
#[derive(Clone, Copy, Debug)]
pub struct FleetLayout {
    pub os_pct: usize,
    pub library_pct: usize,
    pub zero_pct: usize,
}

impl Default for FleetLayout {
    fn default() -> Self {
        Self {
            os_pct: 40,
            library_pct: 20,
            zero_pct: 20,
        }
    }
}

/// Fills `page` with deterministic pseudo-random bytes for content `id`.
pub fn fill_content(page: &mut [u8], id: u64) {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for chunk in page.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

/// Image `vm` of a fleet (default layout, `pages` pages) as a file in
/// `dir`, written once: `dir/fleet-<vm>.img`.
pub fn fleet_image_file(dir: &std::path::Path, vm: usize, pages: usize) -> std::path::PathBuf {
    let path = dir.join(format!("fleet-{vm}.img"));
    if !path.exists() {
        std::fs::write(&path, fleet_image(vm, pages, FleetLayout::default()))
            .expect("writing a fleet image");
    }
    path
}

/// The bytes of image `vm` of a fleet.
pub fn fleet_image(vm: usize, pages: usize, layout: FleetLayout) -> Vec<u8> {
    let mut image = vec![0u8; pages * PAGE_SIZE];
    let os_end = pages * layout.os_pct / 100;
    let library_end = os_end + pages * layout.library_pct / 100;
    let zero_end = library_end + pages * layout.zero_pct / 100;
    for (index, page) in image.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let content = if index < os_end {
            // A few OS pages repeat inside the image too.
            Some(1_000_000 + (index % (os_end.max(1) * 9 / 10).max(1)) as u64)
        } else if index < library_end {
            vm.is_multiple_of(2)
                .then_some(2_000_000 + index as u64)
                .or(Some(10_000_000 * (vm as u64 + 1) + index as u64))
        } else if index < zero_end {
            None
        } else {
            // Unique to this VM; every 16th page repeats its neighbour.
            let base = if index % 16 == 0 && index > zero_end {
                index - 1
            } else {
                index
            };
            Some(10_000_000 * (vm as u64 + 1) + base as u64)
        };
        if let Some(id) = content {
            fill_content(page, id);
        }
    }
    image
}

/// Writes a fleet of `vms` images of `pages` pages into `dir`.
pub fn write_fleet(
    dir: &Path,
    vms: usize,
    pages: usize,
    layout: FleetLayout,
) -> std::io::Result<Vec<PathBuf>> {
    (0..vms)
        .map(|vm| {
            let path = dir.join(format!("vm{vm}.img"));
            std::fs::write(&path, fleet_image(vm, pages, layout))?;
            Ok(path)
        })
        .collect()
}

/// Ground truth: content hash → (pages, VMs) over the given memories.
pub fn count_contents(memories: &[&[u8]]) -> HashMap<[u8; 32], (u32, u32)> {
    let mut counts: HashMap<[u8; 32], (u32, u32)> = HashMap::new();
    for memory in memories {
        let mut in_vm: HashMap<[u8; 32], u32> = HashMap::new();
        for page in memory.chunks_exact(PAGE_SIZE) {
            *in_vm.entry(*blake3::hash(page).as_bytes()).or_insert(0) += 1;
        }
        for (hash, n) in in_vm {
            let entry = counts.entry(hash).or_insert((0, 0));
            entry.0 += n;
            entry.1 += 1;
        }
    }
    counts
}

/// Ground-truth template selection, by the rule the agent documents: contents
/// held by at least `min_vms` VMs, not the zero page, ranked by pages, then
/// VMs, then hash; at most `max` of them.
pub fn expected_templates(
    counts: &HashMap<[u8; 32], (u32, u32)>,
    min_vms: u32,
    max: usize,
) -> Vec<([u8; 32], u32, u32)> {
    let zero = *blake3::hash(&[0u8; PAGE_SIZE]).as_bytes();
    let mut eligible: Vec<([u8; 32], u32, u32)> = counts
        .iter()
        .filter(|(hash, (_, vms))| *vms >= min_vms && **hash != zero)
        .map(|(hash, (pages, vms))| (*hash, *pages, *vms))
        .collect();
    eligible.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    eligible.truncate(max);
    eligible
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_shares_what_it_says() {
        let images: Vec<Vec<u8>> = (0..4)
            .map(|vm| fleet_image(vm, 200, FleetLayout::default()))
            .collect();
        let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
        let counts = count_contents(&refs);
        let zero = *blake3::hash(&[0u8; PAGE_SIZE]).as_bytes();
        assert_eq!(counts[&zero], (160, 4));
        let shared_by_all = counts
            .iter()
            .filter(|(h, c)| c.1 == 4 && **h != zero)
            .count();
        let shared_by_two = counts.values().filter(|c| c.1 == 2).count();
        assert_eq!(shared_by_all, 72); // 80 OS pages, 72 distinct contents
        assert_eq!(shared_by_two, 40);
    }
}
