//! Reading guest memory out of a VMM process.
//!
//! Two ways, chosen per slot:
//! - **mapped**: when the slot lives in a sealed memfd (QEMU's
//!   `memory-backend-memfd`, pagefp's test VMM), the agent maps the same file
//!   read-only through `/proc/PID/map_files` and hashes in place, without a
//!   copy. Only sealed files (`F_SEAL_SHRINK`) are mapped: the VMM cannot
//!   truncate them under the agent (which would raise SIGBUS).
//! - **copied**: `process_vm_readv`, for anonymous memory. A VMM that exits
//!   mid-read makes the read fail (ESRCH/EFAULT), never the agent.

use std::{fs::File, io, num::NonZeroUsize, os::fd::AsFd, path::PathBuf, ptr::NonNull};

use nix::{
    fcntl::{FcntlArg, SealFlag, fcntl},
    sys::{
        mman::{MapFlags, ProtFlags, mmap, munmap},
        uio::{RemoteIoVec, process_vm_readv},
    },
    unistd::Pid,
};

use crate::PAGE_SIZE;

/// A read-only view of a guest slot mapped from the VMM's sealed memfd.
#[derive(Debug)]
pub struct MappedSlot {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only memory owned by this struct; sharing a
// pointer to it between threads is sound.
unsafe impl Send for MappedSlot {}
// SAFETY: as above, only shared reads happen through it.
unsafe impl Sync for MappedSlot {}

impl MappedSlot {
    /// Maps `[uaddr, uaddr+size)` of process `pid` if it is backed by a sealed
    /// shared file; `Ok(None)` if it is not (use [`read_copied`]).
    pub fn open(pid: u32, uaddr: u64, size: u64) -> io::Result<Option<Self>> {
        let Some((start, end, file_offset)) = find_file_mapping(pid, uaddr, size)? else {
            return Ok(None);
        };
        let path = PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(_) => return Ok(None),
        };
        let seals = match fcntl(file.as_fd(), FcntlArg::F_GET_SEALS) {
            Ok(bits) => SealFlag::from_bits_truncate(bits),
            Err(_) => return Ok(None),
        };
        if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            return Ok(None);
        }
        let offset = file_offset + (uaddr - start);
        let file_len = file.metadata()?.len();
        if offset + size > file_len {
            return Ok(None);
        }
        let Some(len) = NonZeroUsize::new(size as usize) else {
            return Ok(None);
        };
        // SAFETY: a fresh read-only shared mapping of a file we hold open; the
        // range lies inside the file, which cannot shrink (F_SEAL_SHRINK).
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ,
                // Fault the whole slot in at once: far cheaper than a fault
                // per page during the first pass.
                MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
                file.as_fd(),
                offset as i64,
            )
        }
        .map_err(io::Error::from)?;
        Ok(Some(Self {
            ptr: ptr.cast(),
            len: size as usize,
        }))
    }

    /// The bytes of page `page` of the slot.
    pub fn page(&self, page: u32) -> Option<&[u8]> {
        let start = page as usize * PAGE_SIZE;
        if start + PAGE_SIZE > self.len {
            return None;
        }
        // SAFETY: in bounds of a live read-only mapping; guest writes may
        // change the bytes concurrently, which is fine for u8 reads (the
        // registry's generations discard hashes of pages written meanwhile).
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), PAGE_SIZE) })
    }
}

impl Drop for MappedSlot {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping made in `open`, unmapped once.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// Finds the shared file mapping of `pid` that covers `[uaddr, uaddr+size)`:
/// (start, end, file offset of start).
fn find_file_mapping(pid: u32, uaddr: u64, size: u64) -> io::Result<Option<(u64, u64, u64)>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms), Some(offset), Some(_dev), Some(inode)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset)) = (
            u64::from_str_radix(start, 16),
            u64::from_str_radix(end, 16),
            u64::from_str_radix(offset, 16),
        ) else {
            continue;
        };
        if start <= uaddr && uaddr + size <= end {
            let shared = perms.as_bytes().get(3) == Some(&b's');
            return Ok((shared && inode != "0").then_some((start, end, offset)));
        }
    }
    Ok(None)
}

/// Reads pages of process `pid` at `uaddr + page * PAGE_SIZE` into `buf`
/// (`pages.len() * PAGE_SIZE` bytes). Returns, per page, whether it was read.
pub fn read_copied(pid: u32, uaddr: u64, pages: &[u32], buf: &mut [u8]) -> Vec<bool> {
    let mut ok = vec![false; pages.len()];
    let mut i = 0;
    while i < pages.len() {
        // One contiguous run per call, up to 256 pages.
        let mut run = 1;
        while i + run < pages.len() && run < 256 && pages[i + run] == pages[i] + run as u32 {
            run += 1;
        }
        let remote = [RemoteIoVec {
            base: (uaddr + u64::from(pages[i]) * PAGE_SIZE as u64) as usize,
            len: run * PAGE_SIZE,
        }];
        let local = &mut buf[i * PAGE_SIZE..(i + run) * PAGE_SIZE];
        let read = process_vm_readv(
            Pid::from_raw(pid as i32),
            &mut [io::IoSliceMut::new(local)],
            &remote,
        )
        .unwrap_or(0);
        let whole = read / PAGE_SIZE;
        ok[i..i + whole].fill(true);
        if whole < run && whole > 0 {
            // Partial: retry the rest page by page on the next turns.
            i += whole;
            continue;
        }
        if whole == 0 && run > 1 {
            // Try the first page alone, so one bad page does not sink a run.
            let single = [RemoteIoVec {
                base: remote[0].base,
                len: PAGE_SIZE,
            }];
            let local = &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            let read = process_vm_readv(
                Pid::from_raw(pid as i32),
                &mut [io::IoSliceMut::new(local)],
                &single,
            )
            .unwrap_or(0);
            ok[i] = read == PAGE_SIZE;
            i += 1;
            continue;
        }
        i += run;
    }
    ok
}

/// Is the page all zero? (Cheaper than hashing it.)
pub fn is_zero_page(page: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle part.
        unsafe { page.align_to::<u64>() }
    };
    prefix.iter().all(|b| *b == 0)
        && words.iter().all(|w| *w == 0)
        && suffix.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_copied_and_reports_bad_pages() {
        let data: Vec<u8> = (0..4 * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 + 1)
            .collect();
        let mut buf = vec![0u8; 3 * PAGE_SIZE];
        let pid = std::process::id();
        let ok = read_copied(pid, data.as_ptr() as u64, &[0, 1, 3], &mut buf);
        assert_eq!(ok, vec![true, true, true]);
        assert!(buf[..PAGE_SIZE].iter().all(|b| *b == 1));
        assert!(buf[2 * PAGE_SIZE..].iter().all(|b| *b == 4));
        // An address nothing is mapped at.
        let ok = read_copied(
            pid,
            8 * PAGE_SIZE as u64,
            &[0, 1],
            &mut buf[..2 * PAGE_SIZE],
        );
        assert_eq!(ok, vec![false, false]);
    }

    #[test]
    fn detects_zero_pages() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&page));
        page[PAGE_SIZE - 1] = 1;
        assert!(!is_zero_page(&page));
    }
}
