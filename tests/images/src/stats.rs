//! What the images hold, page by page: non-zero pages, and which of them
//! other images hold too (the pages a template could stand for).

use std::{collections::HashMap, io::Read as _, path::Path};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The x86 guest page the dumps are counted in. The image builder stands
/// alone (it does not build the agent and its eBPF programs), so it keeps
/// this copy of `agent::page::PAGE_SIZE`; a unit test of `pagefp-tests`
/// checks the two agree.
pub const PAGE: usize = 4096;

/// Page figures of one image, against the other images of its set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageStats {
    pub pages: u64,
    /// Pages that are not all zero.
    pub nonzero: u64,
    /// Distinct non-zero contents.
    pub distinct: u64,
    /// Non-zero pages whose content at least one other image holds too.
    pub shared: u64,
    /// Non-zero pages whose content no other image holds.
    pub own: u64,
}

/// blake3 of every page of the file at `path`.
pub fn page_hashes(path: &Path) -> anyhow::Result<Vec<[u8; 32]>> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hashes = Vec::new();
    let mut buffer = vec![0u8; 256 * PAGE];
    loop {
        let mut filled = 0;
        while filled < buffer.len() {
            let read = file.read(&mut buffer[filled..])?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        hashes.extend(
            buffer[..filled]
                .chunks(PAGE)
                .map(|page| *blake3::hash(page).as_bytes()),
        );
        if filled < buffer.len() {
            return Ok(hashes);
        }
    }
}

/// blake3 of an all-zero page.
pub fn zero_page_hash() -> [u8; 32] {
    *blake3::hash(&[0u8; PAGE]).as_bytes()
}

/// Figures for each of `images` (files of guest RAM), hashed on two
/// threads, and the number of distinct non-zero contents in all of them.
pub fn page_stats(images: &[&Path]) -> anyhow::Result<(Vec<PageStats>, u64)> {
    let hashes: Vec<Vec<[u8; 32]>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|worker| {
                scope.spawn(move || {
                    images
                        .iter()
                        .enumerate()
                        .filter(|(index, _)| index % 2 == worker)
                        .map(|(index, path)| page_hashes(path).map(|hashes| (index, hashes)))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, Vec<[u8; 32]>)> = Vec::new();
        for worker in workers {
            all.extend(worker.join().expect("hashing thread panicked")?);
        }
        all.sort_by_key(|(index, _)| *index);
        anyhow::Ok(all.into_iter().map(|(_, hashes)| hashes).collect())
    })?;
    Ok(stats_of(&hashes))
}

/// The figures from each image's page hashes, and the number of distinct
/// non-zero contents in all of them.
pub fn stats_of(hashes: &[Vec<[u8; 32]>]) -> (Vec<PageStats>, u64) {
    let zero = zero_page_hash();
    // Content -> (the first image holding it, whether another does too).
    let mut holders: HashMap<[u8; 32], (usize, bool)> = HashMap::new();
    for (index, pages) in hashes.iter().enumerate() {
        for hash in pages.iter().filter(|hash| **hash != zero) {
            let holder = holders.entry(*hash).or_insert((index, false));
            if holder.0 != index {
                holder.1 = true;
            }
        }
    }
    let figures = hashes
        .iter()
        .map(|pages| {
            let mut stats = PageStats {
                pages: pages.len() as u64,
                ..PageStats::default()
            };
            let mut distinct = std::collections::HashSet::new();
            for hash in pages.iter().filter(|hash| **hash != zero) {
                stats.nonzero += 1;
                distinct.insert(hash);
                if holders[hash].1 {
                    stats.shared += 1;
                } else {
                    stats.own += 1;
                }
            }
            stats.distinct = distinct.len() as u64;
            stats
        })
        .collect();
    (figures, holders.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_and_own_pages() {
        let zero = zero_page_hash();
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let (stats, distinct) = stats_of(&[vec![zero, a, a, b], vec![a, c, zero, zero]]);
        assert_eq!(distinct, 3);
        assert_eq!(
            stats[0],
            PageStats {
                pages: 4,
                nonzero: 3,
                distinct: 2,
                shared: 2,
                own: 1
            }
        );
        assert_eq!(
            stats[1],
            PageStats {
                pages: 4,
                nonzero: 2,
                distinct: 2,
                shared: 1,
                own: 1
            }
        );
    }
}
