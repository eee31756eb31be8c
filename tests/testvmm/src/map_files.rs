//! Another process's guest memory through `/proc/PID/map_files`: what a
//! migration does with a VMM's sealed memfds (read the source's, write the
//! destination's). Root only, as `/proc/PID/map_files` is.

use std::{fs::OpenOptions, num::NonZeroUsize, os::fd::AsFd, ptr::NonNull};

use anyhow::{Context as _, bail};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use super::MemoryRegion;

/// One region of another process's memory, mapped shared from the file
/// behind it.
pub struct MappedRegion {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is owned by this struct; writes need `&mut self`.
unsafe impl Send for MappedRegion {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Maps `[uaddr, uaddr+size)` of process `pid`, which must lie in one
    /// shared file mapping (a memfd), read-only or read-write.
    pub fn open(pid: u32, uaddr: u64, size: u64, writable: bool) -> anyhow::Result<Self> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .with_context(|| format!("reading /proc/{pid}/maps: is the VMM running?"))?;
        let (start, end, offset) = shared_file_mapping(&maps, uaddr, size).with_context(|| {
            format!(
                "[{uaddr:#x}, +{size:#x}) of pid {pid} is not inside one shared file mapping \
                 (guest memory must live in a memfd)"
            )
        })?;
        let path = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .with_context(|| format!("opening {path} (needs root)"))?;
        let len = NonZeroUsize::new(size as usize).context("an empty region")?;
        let mut prot = ProtFlags::PROT_READ;
        if writable {
            prot |= ProtFlags::PROT_WRITE;
        }
        // SAFETY: a fresh shared mapping of a file we hold open, inside the
        // range the VMM maps; the VMM's memfds are sealed against shrinking.
        let ptr = unsafe {
            mmap(
                None,
                len,
                prot,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                (offset + (uaddr - start)) as i64,
            )
        }
        .with_context(|| format!("mapping {path}"))?;
        Ok(Self {
            ptr: ptr.cast(),
            len: size as usize,
            writable,
        })
    }

    /// Maps one region that a VMM's `info` reported.
    pub fn of(pid: u32, region: &MemoryRegion, writable: bool) -> anyhow::Result<Self> {
        Self::open(pid, region.uaddr, region.size, writable)
            .with_context(|| format!("guest memory slot {} of VMM pid {pid}", region.slot))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> anyhow::Result<&mut [u8]> {
        if !self.writable {
            bail!("this region was mapped read-only");
        }
        // SAFETY: a writable mapping of `len` bytes; &mut self makes this the
        // only access from this process.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) })
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `open`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// (start, end, file offset) of the shared file mapping of `maps` that
/// covers `[uaddr, uaddr+size)`.
pub fn shared_file_mapping(maps: &str, uaddr: u64, size: u64) -> Option<(u64, u64, u64)> {
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let perms = fields.next()?;
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        (start <= uaddr
            && uaddr.checked_add(size)? <= end
            && perms.as_bytes().get(3) == Some(&b's'))
        .then_some((start, end, offset))
    })
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
        let from = MappedRegion::of(source_pid, region, false)?;
        let mut to = MappedRegion::of(dest_pid, target, true)?;
        to.as_mut_slice()?.copy_from_slice(from.as_slice());
        copied += region.size;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_shared_mapping_around_a_range() {
        let maps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n\
7f0000100000-7f0000500000 rw-s 00001000 00:01 42 /memfd:pagefp-guest-ram (deleted)\n";
        assert_eq!(
            shared_file_mapping(maps, 0x7f00_0010_2000, 0x1000),
            Some((0x7f00_0010_0000, 0x7f00_0050_0000, 0x1000))
        );
        assert_eq!(
            shared_file_mapping(maps, 0x7f00_0000_0000, 0x1000),
            None,
            "private"
        );
        assert_eq!(
            shared_file_mapping(maps, 0x7f00_004f_f000, 0x2000),
            None,
            "runs past the end"
        );
    }
}
