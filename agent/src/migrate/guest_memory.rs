//! Guest memory as a migration sees it: regions in guest physical address
//! order, numbered by one global page index (the index on the wire).
//!
//! The source reads through the agent's read-only memfd mapping (or
//! `process_vm_readv` for anonymous memory); the destination writes through
//! a shared read-write mapping of the incoming VMM's memfd, opened via
//! `/proc/PID/map_files` (root only, like the agent).

use std::{fs::OpenOptions, io, num::NonZeroUsize, os::fd::AsFd, ptr::NonNull};

use anyhow::{Context as _, bail};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use super::wire::{PAGE, Region};
use crate::memory::{MappedSlot, read_copied};

/// Where each region's pages start in the global page index.
#[derive(Clone, Debug)]
pub struct Layout {
    pub regions: Vec<Region>,
    starts: Vec<u32>,
    total: u32,
}

impl Layout {
    pub fn new(mut regions: Vec<Region>) -> anyhow::Result<Self> {
        regions.sort_by_key(|r| r.gpa);
        let mut starts = Vec::with_capacity(regions.len());
        let mut total: u64 = 0;
        for (i, r) in regions.iter().enumerate() {
            if r.size == 0
                || !r.size.is_multiple_of(PAGE as u64)
                || !r.gpa.is_multiple_of(PAGE as u64)
            {
                bail!(
                    "region of slot {} (gpa {:#x}, {} bytes) is not whole pages",
                    r.slot,
                    r.gpa,
                    r.size
                );
            }
            if i > 0 && regions[i - 1].gpa + regions[i - 1].size > r.gpa {
                bail!(
                    "regions of slots {} and {} overlap",
                    regions[i - 1].slot,
                    r.slot
                );
            }
            starts.push(total as u32);
            total += r.size / PAGE as u64;
        }
        let total = u32::try_from(total).context("guest memory over 16 TiB")?;
        Ok(Self {
            regions,
            starts,
            total,
        })
    }

    pub fn pages(&self) -> u32 {
        self.total
    }

    pub fn bytes(&self) -> u64 {
        u64::from(self.total) * PAGE as u64
    }

    /// (region index, page inside it) of a global page.
    pub fn locate(&self, page: u32) -> Option<(usize, u32)> {
        if page >= self.total {
            return None;
        }
        let region = self.starts.partition_point(|s| *s <= page) - 1;
        Some((region, page - self.starts[region]))
    }

    /// The global page of a guest physical address.
    pub fn page_of_gpa(&self, gpa: u64) -> Option<u32> {
        let region = self
            .regions
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        let r = &self.regions[region];
        (gpa < r.gpa + r.size).then(|| self.starts[region] + ((gpa - r.gpa) / PAGE as u64) as u32)
    }
}

enum SourceRegion {
    Mapped(MappedSlot),
    Copied { pid: u32, uaddr: u64 },
}

/// The source VM's memory, read-only.
pub struct SourceMemory {
    pub layout: Layout,
    regions: Vec<SourceRegion>,
}

impl SourceMemory {
    /// `uaddrs[i]` is where region `i` of `layout` lives in process `pid`.
    pub fn open(pid: u32, layout: Layout, uaddrs: &[u64]) -> anyhow::Result<Self> {
        let mut regions = Vec::with_capacity(layout.regions.len());
        for (region, uaddr) in layout.regions.iter().zip(uaddrs) {
            let mapped = MappedSlot::open(pid, *uaddr, region.size).with_context(|| {
                format!(
                    "reading the memory map of VMM pid {pid} (is it still running? are you root?)"
                )
            })?;
            regions.push(match mapped {
                Some(slot) => SourceRegion::Mapped(slot),
                None => SourceRegion::Copied { pid, uaddr: *uaddr },
            });
        }
        Ok(Self { layout, regions })
    }

    /// Copies page `page` into `buf`.
    pub fn read(&self, page: u32, buf: &mut [u8]) -> anyhow::Result<()> {
        let (region, index) = self
            .layout
            .locate(page)
            .with_context(|| format!("page {page} is outside guest memory"))?;
        match &self.regions[region] {
            SourceRegion::Mapped(slot) => {
                buf.copy_from_slice(slot.page(index).context("page outside its mapping")?);
            }
            SourceRegion::Copied { pid, uaddr } => {
                if !read_copied(*pid, *uaddr, &[index], buf)[0] {
                    bail!("cannot read page {page} of VMM pid {pid}: did the VMM exit?");
                }
            }
        }
        Ok(())
    }
}

/// One writable region of the destination VMM.
struct WritableRegion {
    ptr: NonNull<u8>,
    len: usize,
}

impl Drop for WritableRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping made in `DestMemory::open`, unmapped once.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// The destination VMM's memory, mapped read-write.
pub struct DestMemory {
    pub layout: Layout,
    regions: Vec<WritableRegion>,
}

// SAFETY: the mappings are owned by this struct; the receiver writes through
// `&mut self` and the digest threads only read through `&self`.
unsafe impl Send for DestMemory {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for DestMemory {}

impl DestMemory {
    /// Maps `[uaddr, uaddr+size)` of every region of VMM `pid` read-write.
    pub fn open(pid: u32, layout: Layout, uaddrs: &[u64]) -> anyhow::Result<Self> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| {
            format!("reading /proc/{pid}/maps: is the destination VMM running?")
        })?;
        let mut regions = Vec::new();
        for (region, &uaddr) in layout.regions.iter().zip(uaddrs) {
            let (start, end, offset) =
                file_mapping(&maps, uaddr, region.size).with_context(|| {
                    format!(
                        "slot {} of VMM pid {pid} at {uaddr:#x} is not a shared file mapping; \
                     the destination VMM must keep guest memory in a memfd",
                        region.slot
                    )
                })?;
            let path = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {path} read-write (run as root)"))?;
            let len = NonZeroUsize::new(region.size as usize).context("empty region")?;
            // SAFETY: a fresh shared mapping of a file we hold open, inside
            // the range the VMM maps; the VMM seals its memfds against shrinking.
            let ptr = unsafe {
                mmap(
                    None,
                    len,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_SHARED,
                    file.as_fd(),
                    (offset + (uaddr - start)) as i64,
                )
            }
            .map_err(io::Error::from)
            .with_context(|| format!("mapping {path}"))?;
            regions.push(WritableRegion {
                ptr: ptr.cast(),
                len: region.size as usize,
            });
        }
        Ok(Self { layout, regions })
    }

    fn slice(&self, page: u32) -> Option<NonNull<u8>> {
        let (region, index) = self.layout.locate(page)?;
        let r = &self.regions[region];
        let start = index as usize * PAGE;
        (start + PAGE <= r.len).then(|| {
            // SAFETY: in bounds of the mapping, checked above.
            unsafe { r.ptr.add(start) }
        })
    }

    pub fn page(&self, page: u32) -> Option<&[u8]> {
        // SAFETY: a page inside a live mapping; only this process writes it,
        // through `&mut self`.
        self.slice(page)
            .map(|p| unsafe { std::slice::from_raw_parts(p.as_ptr(), PAGE) })
    }

    pub fn write(&mut self, page: u32, data: &[u8]) -> bool {
        match self.slice(page) {
            Some(p) => {
                // SAFETY: a page inside a live writable mapping; `&mut self`
                // makes this the only access from this process.
                unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), PAGE) }.copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    pub fn zero(&mut self, page: u32) -> bool {
        match self.slice(page) {
            Some(p) => {
                // SAFETY: as in `write`.
                unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), PAGE) }.fill(0);
                true
            }
            None => false,
        }
    }
}

/// (start, end, file offset) of the shared file mapping covering the range.
fn file_mapping(maps: &str, uaddr: u64, size: u64) -> Option<(u64, u64, u64)> {
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let range = fields.next()?;
        let perms = fields.next()?;
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let (start, end) = range.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        (start <= uaddr && uaddr + size <= end && perms.as_bytes().get(3) == Some(&b's'))
            .then_some((start, end, offset))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(slot: u32, gpa: u64, pages: u64) -> Region {
        Region {
            slot,
            gpa,
            size: pages * PAGE as u64,
            read_only: false,
        }
    }

    #[test]
    fn global_pages_follow_gpa_order() {
        let layout = Layout::new(vec![region(100, 0xE000_0000, 2), region(0, 0, 3)]).unwrap();
        assert_eq!(layout.pages(), 5);
        assert_eq!(layout.locate(0), Some((0, 0)));
        assert_eq!(layout.locate(3), Some((1, 0)));
        assert_eq!(layout.locate(5), None);
        assert_eq!(layout.page_of_gpa(0xE000_1000), Some(4));
        assert_eq!(layout.page_of_gpa(0x3000), None);
        assert!(Layout::new(vec![region(0, 0, 3), region(1, 0x1000, 1)]).is_err());
    }
}
