//! The whole-memory check at the end of a migration: guest memory cut into
//! chunks of `chunk_pages` pages; a chunk's digest is the blake3 of its
//! pages' checks, each page's check its seeded xxh3-128. Both ends compute
//! it independently of any tracking, so a page the tracking missed, lost or
//! misplaced shows up as a mismatch.
//!
//! Why xxh3 and not blake3 for the pages: this check catches pagefp's own
//! faults (a missed write, a page written to the wrong place), not an
//! attacker. The bytes on the wire are authenticated by TLS, and a
//! template's content by its blake3 address (which a hostile guest must not
//! be able to collide with another VM's page). A fault gives no chance to
//! aim at a collision of a 128-bit check whose seed, fresh for each
//! migration, the guest never sees; and xxh3 reads a page about five times
//! faster than blake3, which is downtime: both ends hash all of memory
//! while the VM is paused.

use std::{
    borrow::Cow,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use twox_hash::XxHash3_128;

use crate::page::PAGE_SIZE;

/// Pages per digest chunk (4 MiB).
pub const CHUNK_PAGES: u32 = 1024;

/// How a migration's digests are computed; the source picks a fresh seed
/// and sends both in its hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DigestKey {
    pub chunk_pages: u32,
    pub seed: u64,
}

impl DigestKey {
    /// A key with a seed from the system's randomness.
    pub fn fresh(chunk_pages: u32) -> anyhow::Result<Self> {
        Ok(Self {
            chunk_pages,
            seed: u64::from_le_bytes(crate::random::bytes()?),
        })
    }

    /// One page's check.
    pub fn page(&self, page: &[u8]) -> [u8; 16] {
        XxHash3_128::oneshot_with_seed(self.seed, page).to_le_bytes()
    }
}

/// Digests of `pages` pages; `check(page, buf)` is the [`DigestKey::page`]
/// of a page, read in place or copied into `buf` (a page of scratch).
/// Pages marked in `holes` (holes in the memory's files, which read as
/// zeros) are not read: reading them would allocate them. On `threads`
/// threads (this one among them).
pub fn chunk_digests<F>(
    pages: u32,
    key: DigestKey,
    holes: &[bool],
    threads: usize,
    check: F,
) -> anyhow::Result<Vec<[u8; 32]>>
where
    F: Fn(u32, &mut [u8]) -> anyhow::Result<[u8; 16]> + Sync,
{
    let job = DigestJob::new(pages, key, Cow::Borrowed(holes), check);
    job.run(threads)?;
    job.digests()
}

/// Computes the digest of every chunk of `digests` that is `None` (as
/// [`chunk_digests`] does), on up to `threads` threads; the others are
/// kept.
pub fn fill_digests<F>(
    pages: u32,
    key: DigestKey,
    holes: &[bool],
    digests: &mut [Option<[u8; 32]>],
    threads: usize,
    check: F,
) -> anyhow::Result<()>
where
    F: Fn(u32, &mut [u8]) -> anyhow::Result<[u8; 16]> + Sync,
{
    let chunk_pages = key.chunk_pages.max(1);
    anyhow::ensure!(
        digests.len() == pages.div_ceil(chunk_pages) as usize,
        "{} digests for {pages} pages in chunks of {chunk_pages}",
        digests.len()
    );
    let missing: Vec<u32> = (0..digests.len() as u32)
        .filter(|&chunk| digests[chunk as usize].is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let job = DigestJob::of_chunks(pages, key, Cow::Borrowed(holes), missing, check);
    job.run(threads)?;
    for (chunk, digest) in job.into_computed() {
        digests[chunk as usize] = Some(digest);
    }
    Ok(())
}

/// Chunk digests ([`chunk_digests`]) computed by however many threads call
/// [`DigestJob::work`], each taking the next chunk: a thread may join in
/// when it is free.
pub struct DigestJob<'a, F> {
    pages: u32,
    key: DigestKey,
    holes: Cow<'a, [bool]>,
    check: F,
    /// The chunks to compute, and the index of the next one to take.
    chunks: Vec<u32>,
    next: AtomicUsize,
    computed: Mutex<Vec<(u32, [u8; 32])>>,
}

impl<'a, F> DigestJob<'a, F>
where
    F: Fn(u32, &mut [u8]) -> anyhow::Result<[u8; 16]> + Sync,
{
    /// Every chunk of `pages` pages.
    pub fn new(pages: u32, key: DigestKey, holes: Cow<'a, [bool]>, check: F) -> Self {
        let chunks = (0..pages.div_ceil(key.chunk_pages.max(1))).collect();
        Self::of_chunks(pages, key, holes, chunks, check)
    }

    fn of_chunks(
        pages: u32,
        key: DigestKey,
        holes: Cow<'a, [bool]>,
        chunks: Vec<u32>,
        check: F,
    ) -> Self {
        Self {
            pages,
            key,
            holes,
            check,
            computed: Mutex::new(Vec::with_capacity(chunks.len())),
            chunks,
            next: AtomicUsize::new(0),
        }
    }

    /// Computes chunks until none is left to take.
    pub fn work(&self) -> anyhow::Result<()> {
        let chunk_pages = self.key.chunk_pages.max(1);
        let zero = self.key.page(&[0; PAGE_SIZE]);
        let mut buf = vec![0u8; PAGE_SIZE];
        let is_hole = |page: u32| self.holes.get(page as usize) == Some(&true);
        while let Some(&chunk) = self.chunks.get(self.next.fetch_add(1, Ordering::Relaxed)) {
            let first = chunk.saturating_mul(chunk_pages).min(self.pages);
            let end = first.saturating_add(chunk_pages).min(self.pages);
            let digest = chunk_digest(first..end, zero, is_hole, &self.check, &mut buf)?;
            self.computed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((chunk, digest));
        }
        Ok(())
    }

    /// [`Self::work`] on `threads` threads, this one among them.
    fn run(&self, threads: usize) -> anyhow::Result<()> {
        std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads.max(1))
                .map(|_| scope.spawn(|| self.work()))
                .collect();
            let mine = self.work();
            for helper in helpers {
                helper
                    .join()
                    .map_err(|_| anyhow::anyhow!("a digest thread panicked"))??;
            }
            mine
        })
    }

    fn into_computed(self) -> Vec<(u32, [u8; 32])> {
        self.computed
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Every chunk's digest in order, once the workers are done.
    pub fn digests(self) -> anyhow::Result<Vec<[u8; 32]>> {
        let wanted = self.chunks.len();
        let mut computed = self.into_computed();
        anyhow::ensure!(
            computed.len() == wanted,
            "{} of {wanted} digest chunks computed (a worker failed)",
            computed.len()
        );
        computed.sort_unstable_by_key(|(chunk, _)| *chunk);
        Ok(computed.into_iter().map(|(_, digest)| digest).collect())
    }
}

/// The digest of the chunk of pages `pages`: the blake3 of each page's
/// check (`zero`, the zero page's, for pages `is_hole` names; else
/// `check(page, buf)`, `buf` a page of scratch).
pub fn chunk_digest<F>(
    pages: std::ops::Range<u32>,
    zero: [u8; 16],
    is_hole: impl Fn(u32) -> bool,
    check: &F,
    buf: &mut [u8],
) -> anyhow::Result<[u8; 32]>
where
    F: Fn(u32, &mut [u8]) -> anyhow::Result<[u8; 16]>,
{
    let mut hasher = blake3::Hasher::new();
    for page in pages {
        let page_check = if is_hole(page) {
            zero
        } else {
            check(page, buf)?
        };
        hasher.update(&page_check);
    }
    Ok(*hasher.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: DigestKey = DigestKey {
        chunk_pages: 4,
        seed: 0x5eed,
    };

    #[test]
    fn a_changed_page_changes_only_its_chunk() {
        let mut memory = vec![0u8; 10 * PAGE_SIZE];
        memory[3 * PAGE_SIZE] = 1;
        let read = |m: &Vec<u8>| {
            let m = m.clone();
            move |page: u32, _: &mut [u8]| Ok(KEY.page(&m[page as usize * PAGE_SIZE..][..PAGE_SIZE]))
        };
        let before = chunk_digests(10, KEY, &[], 2, read(&memory)).unwrap();
        assert_eq!(before.len(), 3);
        // A chunk's digest is the blake3 of its pages' seeded xxh3-128.
        let mut first = blake3::Hasher::new();
        for page in memory.chunks(PAGE_SIZE).take(4) {
            first.update(&XxHash3_128::oneshot_with_seed(KEY.seed, page).to_le_bytes());
        }
        assert_eq!(*first.finalize().as_bytes(), before[0]);
        memory[9 * PAGE_SIZE + 5] = 7;
        let after = chunk_digests(10, KEY, &[], 2, read(&memory)).unwrap();
        assert_eq!(before[..2], after[..2]);
        assert_ne!(before[2], after[2]);
    }

    #[test]
    fn holes_count_as_zero_pages_and_are_not_read() {
        let mut memory = vec![0u8; 10 * PAGE_SIZE];
        memory[3 * PAGE_SIZE] = 1;
        let holes: Vec<bool> = (0..10).map(|page| page != 3).collect();
        let read_all = |page: u32, _: &mut [u8]| {
            Ok(KEY.page(&memory[page as usize * PAGE_SIZE..][..PAGE_SIZE]))
        };
        let read_data_only = |page: u32, buf: &mut [u8]| {
            assert_eq!(page, 3, "a hole was read");
            read_all(page, buf)
        };
        assert_eq!(
            chunk_digests(10, KEY, &holes, 2, read_data_only).unwrap(),
            chunk_digests(10, KEY, &[], 2, read_all).unwrap()
        );
    }

    #[test]
    fn only_missing_digests_are_computed_and_match_a_full_pass() {
        let mut memory = vec![0u8; 10 * PAGE_SIZE];
        memory[5 * PAGE_SIZE] = 3;
        let page_of = |page: u32| &memory[page as usize * PAGE_SIZE..][..PAGE_SIZE];
        let read = |page: u32, _: &mut [u8]| {
            assert!(
                (4..8).contains(&page),
                "page {page} outside chunk 1 was read"
            );
            Ok(KEY.page(page_of(page)))
        };
        let full = chunk_digests(10, KEY, &[], 2, |page, _: &mut [u8]| {
            Ok(KEY.page(page_of(page)))
        })
        .unwrap();
        let mut digests = vec![Some(full[0]), None, Some(full[2])];
        fill_digests(10, KEY, &[], &mut digests, 2, read).unwrap();
        assert_eq!(digests, full.iter().copied().map(Some).collect::<Vec<_>>());
        assert!(fill_digests(10, KEY, &[], &mut [None; 2], 2, read).is_err());
    }

    #[test]
    fn each_migration_checks_with_a_seed_of_its_own() {
        let memory = vec![7u8; 4 * PAGE_SIZE];
        let (a, b) = (DigestKey::fresh(4).unwrap(), DigestKey::fresh(4).unwrap());
        let memory = &memory;
        let read = |key: DigestKey| {
            move |page: u32, _: &mut [u8]| {
                Ok(key.page(&memory[page as usize * PAGE_SIZE..][..PAGE_SIZE]))
            }
        };
        assert_ne!(a.seed, b.seed);
        assert_ne!(
            chunk_digests(4, a, &[], 2, read(a)).unwrap(),
            chunk_digests(4, b, &[], 2, read(b)).unwrap()
        );
    }
}
