//! The whole-memory check at the end of a migration: guest memory cut into
//! chunks of `chunk_pages` pages; a chunk's digest is the blake3 of the
//! blake3 hashes of its pages. Both ends compute it independently of any
//! tracking, so a page the tracking missed shows up as a mismatch.

use crate::{
    content::zero_page_hash,
    page::{PAGE_SIZE, is_zero_page},
};

/// Pages per digest chunk (4 MiB).
pub const CHUNK_PAGES: u32 = 1024;

/// Digests of `pages` pages; `read(page, buf)` fills `buf` with a page.
/// Pages marked in `holes` (holes in the memory's files, which read as
/// zeros) are not read: reading them would allocate them.
pub fn chunk_digests<F>(
    pages: u32,
    chunk_pages: u32,
    holes: &[bool],
    read: F,
) -> anyhow::Result<Vec<[u8; 32]>>
where
    F: Fn(u32, &mut [u8]) -> anyhow::Result<()> + Sync,
{
    let chunks = pages.div_ceil(chunk_pages.max(1));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4) as u32;
    let per_thread = chunks.div_ceil(threads.max(1)).max(1);
    let zero = zero_page_hash();
    let read = &read;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..chunks)
            .step_by(per_thread as usize)
            .map(|first_chunk| {
                scope.spawn(move || -> anyhow::Result<Vec<[u8; 32]>> {
                    let mut buf = vec![0u8; PAGE_SIZE];
                    let last_chunk = (first_chunk + per_thread).min(chunks);
                    let mut out = Vec::new();
                    for chunk in first_chunk..last_chunk {
                        let mut hasher = blake3::Hasher::new();
                        let first = chunk * chunk_pages;
                        for page in first..(first + chunk_pages).min(pages) {
                            let hole = holes.get(page as usize) == Some(&true);
                            if !hole {
                                read(page, &mut buf)?;
                            }
                            let hash = if hole || is_zero_page(&buf) {
                                zero
                            } else {
                                *blake3::hash(&buf).as_bytes()
                            };
                            hasher.update(&hash);
                        }
                        out.push(*hasher.finalize().as_bytes());
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(chunks as usize);
        for handle in handles {
            all.extend(handle.join().expect("digest thread panicked")?);
        }
        Ok(all)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_page_changes_only_its_chunk() {
        let mut memory = vec![0u8; 10 * PAGE_SIZE];
        memory[3 * PAGE_SIZE] = 1;
        let read = |m: &Vec<u8>| {
            let m = m.clone();
            move |page: u32, buf: &mut [u8]| {
                buf.copy_from_slice(&m[page as usize * PAGE_SIZE..][..PAGE_SIZE]);
                Ok(())
            }
        };
        let before = chunk_digests(10, 4, &[], read(&memory)).unwrap();
        assert_eq!(before.len(), 3);
        // A chunk's digest is the blake3 of its pages' blake3 hashes.
        let mut first = blake3::Hasher::new();
        for page in memory.chunks(PAGE_SIZE).take(4) {
            first.update(blake3::hash(page).as_bytes());
        }
        assert_eq!(*first.finalize().as_bytes(), before[0]);
        memory[9 * PAGE_SIZE + 5] = 7;
        let after = chunk_digests(10, 4, &[], read(&memory)).unwrap();
        assert_eq!(before[..2], after[..2]);
        assert_ne!(before[2], after[2]);
    }

    #[test]
    fn holes_count_as_zero_pages_and_are_not_read() {
        let mut memory = vec![0u8; 10 * PAGE_SIZE];
        memory[3 * PAGE_SIZE] = 1;
        let holes: Vec<bool> = (0..10).map(|page| page != 3).collect();
        let read_all = |page: u32, buf: &mut [u8]| {
            buf.copy_from_slice(&memory[page as usize * PAGE_SIZE..][..PAGE_SIZE]);
            Ok(())
        };
        let read_data_only = |page: u32, buf: &mut [u8]| {
            assert_eq!(page, 3, "a hole was read");
            read_all(page, buf)
        };
        assert_eq!(
            chunk_digests(10, 4, &holes, read_data_only).unwrap(),
            chunk_digests(10, 4, &[], read_all).unwrap()
        );
    }
}
