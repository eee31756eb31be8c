//! Guest memory as a migration sees it: regions in guest physical address
//! order, numbered by one global page index (the index on the wire).
//!
//! The source reads through the agent's read-only memfd mapping (or
//! `process_vm_readv` for anonymous memory); the destination writes through
//! a shared read-write mapping of the incoming VMM's memfd, opened via
//! `/proc/PID/map_files` (root only, like the agent).

use anyhow::{Context as _, bail};

use crate::{
    guest_memory::{GuestMapping, read_copied},
    page::PAGE_SIZE,
    transport::migration::Region,
};

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
                || !r.size.is_multiple_of(PAGE_SIZE as u64)
                || !r.gpa.is_multiple_of(PAGE_SIZE as u64)
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
            total += r.size / PAGE_SIZE as u64;
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
        u64::from(self.total) * PAGE_SIZE as u64
    }

    /// (region index, page inside it) of a global page.
    pub fn locate(&self, page: u32) -> Option<(usize, u32)> {
        if page >= self.total {
            return None;
        }
        let region = self.starts.partition_point(|s| *s <= page) - 1;
        Some((region, page - self.starts[region]))
    }

    /// Pages `[first, first+count)` split at region boundaries: (region,
    /// its first page, pages, offset into the range); `None` if a page is
    /// outside the memory (or the range overflows).
    pub fn region_runs(&self, first: u32, count: u32) -> Option<Vec<(usize, u32, u32, u32)>> {
        let end = first
            .checked_add(count)
            .filter(|end| *end <= self.pages())?;
        let mut runs = Vec::new();
        let mut page = first;
        while page < end {
            let (region, index) = self.locate(page)?;
            let in_region = (self.regions[region].size / PAGE_SIZE as u64) as u32 - index;
            let run = in_region.min(end - page);
            runs.push((region, index, run, page - first));
            page += run;
        }
        Some(runs)
    }

    /// The global page of a guest physical address.
    pub fn page_of_gpa(&self, gpa: u64) -> Option<u32> {
        let region = self
            .regions
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        let r = &self.regions[region];
        (gpa < r.gpa + r.size)
            .then(|| self.starts[region] + ((gpa - r.gpa) / PAGE_SIZE as u64) as u32)
    }
}

/// The holes of each region's mapping (`None`, or a file system that does
/// not say: no page known to be a hole), by global page index.
fn holes_of<'a>(
    layout: &Layout,
    mappings: impl Iterator<Item = Option<&'a GuestMapping>>,
) -> Vec<bool> {
    let mut holes = Vec::with_capacity(layout.pages() as usize);
    for (region, mapping) in layout.regions.iter().zip(mappings) {
        let pages = (region.size / PAGE_SIZE as u64) as usize;
        match mapping.and_then(GuestMapping::holes) {
            Some(found) if found.len() == pages => holes.extend(found),
            _ => holes.extend(std::iter::repeat_n(false, pages)),
        }
    }
    holes
}

enum SourceRegion {
    Mapped(GuestMapping),
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
            let mapped = GuestMapping::open_sealed(pid, *uaddr, region.size).with_context(|| {
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

    /// Pages known to read as zeros without reading them (holes in the
    /// memory's files), by global page index; false where not known.
    pub fn holes(&self) -> Vec<bool> {
        let mappings = self.regions.iter().map(|region| match region {
            SourceRegion::Mapped(mapping) => Some(mapping),
            SourceRegion::Copied { .. } => None,
        });
        holes_of(&self.layout, mappings)
    }

    /// [`Self::holes`] now, from `earlier` (what it said a moment ago):
    /// each run of earlier holes is checked with one `SEEK_DATA` (cheap
    /// over holes) and looked at page by page only where data appeared in
    /// it. A page that held data earlier counts as data: if it was punched
    /// since, reading it gives the zeros a hole would.
    pub fn holes_since(&self, earlier: &[bool]) -> Vec<bool> {
        let pages = self.layout.pages();
        let mut holes = vec![false; pages as usize];
        let mut page = 0u32;
        while page < pages {
            if earlier.get(page as usize) != Some(&true) {
                page += 1;
                continue;
            }
            let run_end = (page..pages)
                .find(|&p| earlier.get(p as usize) != Some(&true))
                .unwrap_or(pages);
            for (region, index, run, offset) in self
                .layout
                .region_runs(page, run_end - page)
                .unwrap_or_default()
            {
                if let SourceRegion::Mapped(mapping) = &self.regions[region] {
                    let range = index..index + run;
                    let found = if mapping.is_hole(range.clone()) {
                        Some(vec![true; run as usize])
                    } else {
                        mapping.holes_in(range)
                    };
                    if let Some(found) = found.filter(|f| f.len() == run as usize) {
                        let at = (page + offset) as usize;
                        holes[at..at + run as usize].copy_from_slice(&found);
                    }
                }
            }
            page = run_end;
        }
        holes
    }

    /// Maps the data pages of the mapped regions into this process's page
    /// tables ([`GuestMapping::populate_data`]): what the final digest
    /// reads, while the VM is paused, is then not first faulted in.
    pub fn populate(&self) {
        for region in &self.regions {
            if let SourceRegion::Mapped(mapping) = region {
                mapping.populate_data();
            }
        }
    }

    /// [`Self::holes`] of pages `[first, first + count)` only (empty if
    /// the range leaves the memory).
    pub fn holes_in(&self, first: u32, count: u32) -> Vec<bool> {
        let mut holes = Vec::with_capacity(count as usize);
        for (region, index, run, _) in self.layout.region_runs(first, count).unwrap_or_default() {
            let found = match &self.regions[region] {
                SourceRegion::Mapped(mapping) => mapping.holes_in(index..index + run),
                SourceRegion::Copied { .. } => None,
            };
            match found {
                Some(found) if found.len() == run as usize => holes.extend(found),
                _ => holes.extend(std::iter::repeat_n(false, run as usize)),
            }
        }
        holes
    }

    /// Drops this process's page-table entries for pages `[first, first +
    /// count)` of the mapped regions (the bytes stay in the files).
    pub fn drop_page_tables_in(&self, first: u32, count: u32) {
        for (region, index, run, _) in self.layout.region_runs(first, count).unwrap_or_default() {
            if let SourceRegion::Mapped(mapping) = &self.regions[region] {
                mapping.drop_page_tables_in(index..index + run);
            }
        }
    }

    /// Copies page `page` into `buf`.
    pub fn read(&self, page: u32, buf: &mut [u8]) -> anyhow::Result<()> {
        match self.region_of(page)? {
            (SourceRegion::Mapped(slot), index) => {
                buf.copy_from_slice(slot.page(index).context("page outside its mapping")?);
            }
            (SourceRegion::Copied { pid, uaddr }, index) => {
                if !read_copied(*pid, *uaddr, &[index], buf)[0] {
                    bail!("cannot read page {page} of VMM pid {pid}: did the VMM exit?");
                }
            }
        }
        Ok(())
    }

    /// Calls `with` on page `page`: in place where its region is mapped,
    /// else copied into `buf` (a page of scratch).
    pub fn with_page<R>(
        &self,
        page: u32,
        buf: &mut [u8],
        with: impl FnOnce(&[u8]) -> R,
    ) -> anyhow::Result<R> {
        if let (SourceRegion::Mapped(slot), index) = self.region_of(page)? {
            return Ok(with(slot.page(index).context("page outside its mapping")?));
        }
        self.read(page, buf)?;
        Ok(with(buf))
    }

    fn region_of(&self, page: u32) -> anyhow::Result<(&SourceRegion, u32)> {
        let (region, index) = self
            .layout
            .locate(page)
            .with_context(|| format!("page {page} is outside guest memory"))?;
        Ok((&self.regions[region], index))
    }
}

/// The destination VMM's memory, mapped read-write.
pub struct DestMemory {
    pub layout: Layout,
    regions: Vec<GuestMapping>,
}

impl DestMemory {
    /// Maps `[uaddr, uaddr+size)` of every region of VMM `pid` read-write.
    pub fn open(pid: u32, layout: Layout, uaddrs: &[u64]) -> anyhow::Result<Self> {
        let regions = layout
            .regions
            .iter()
            .zip(uaddrs)
            .map(|(region, &uaddr)| {
                GuestMapping::open_writable(pid, uaddr, region.size)
                    .with_context(|| format!("slot {} of the destination VM", region.slot))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { layout, regions })
    }

    pub fn page(&self, page: u32) -> Option<&[u8]> {
        let (region, index) = self.layout.locate(page)?;
        self.regions[region].page(index)
    }

    /// A read-only view of the same memory, for a thread that reads it
    /// back while this one writes it.
    pub fn reader(&self) -> anyhow::Result<SourceMemory> {
        let regions = self
            .regions
            .iter()
            .map(|mapping| mapping.read_only_view().map(SourceRegion::Mapped))
            .collect::<std::io::Result<_>>()
            .context("mapping the destination's memory a second time, read-only")?;
        Ok(SourceMemory {
            layout: self.layout.clone(),
            regions,
        })
    }

    /// Writes `pages` (each a page) at pages `first`, `first + 1`, ...,
    /// through the memory's files ([`GuestMapping::write_pages`]). False
    /// if a page is outside the memory.
    pub fn write_pages(&mut self, first: u32, pages: &[&[u8]]) -> bool {
        let Some(runs) = u32::try_from(pages.len())
            .ok()
            .and_then(|count| self.layout.region_runs(first, count))
        else {
            return false;
        };
        runs.into_iter().all(|(region, index, run, at)| {
            let (at, run) = (at as usize, run as usize);
            self.regions[region].write_pages(index, &pages[at..at + run])
        })
    }

    /// Zeroes pages `[first, first+count)`: their backing freed where the
    /// file system can (a hole reads as zeros and holds no memory), zeros
    /// written otherwise. False if a page is outside the memory.
    pub fn zero_run(&mut self, first: u32, count: u32) -> bool {
        let Some(runs) = self.layout.region_runs(first, count) else {
            return false;
        };
        for (region, index, run, _) in runs {
            if !self.regions[region].discard(index, run) {
                for i in index..index + run {
                    match self.regions[region].page_mut(i) {
                        Some(bytes) => bytes.fill(0),
                        None => return false,
                    }
                }
            }
        }
        true
    }

    /// Pages known to read as zeros without reading them (holes in the
    /// memory's files), by global page index; all false where the file
    /// system does not say.
    pub fn holes(&self) -> Vec<bool> {
        holes_of(&self.layout, self.regions.iter().map(Some))
    }

    /// Unmaps what reading the memory back mapped ([`GuestMapping::drop_page_tables`]).
    pub fn drop_page_tables(&self) {
        for region in &self.regions {
            region.drop_page_tables();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(slot: u32, gpa: u64, pages: u64) -> Region {
        Region {
            slot,
            gpa,
            size: pages * PAGE_SIZE as u64,
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

    /// The holes at the pause, from those found before it: a hole written
    /// since is data, a page punched since still counts as data (it reads
    /// as zeros), the others keep their earlier answer.
    #[test]
    fn holes_since_sees_holes_filled_meanwhile() {
        let mut ram = crate::guest_memory::tests::VmmRam::new(8, true);
        for page in [1, 2, 5] {
            ram.bytes()[page * PAGE_SIZE] = 1;
        }
        let layout = Layout::new(vec![region(0, 0, 8)]).unwrap();
        let memory = SourceMemory::open(std::process::id(), layout, &[ram.uaddr()]).unwrap();
        let before = memory.holes();
        assert_eq!(
            before,
            [true, false, false, true, true, false, true, true],
            "this file system tells holes"
        );
        ram.bytes()[3 * PAGE_SIZE + 100] = 9;
        ram.bytes()[7 * PAGE_SIZE] = 9;
        ram.punch(5);
        assert_eq!(
            memory.holes_since(&before),
            [true, false, false, false, true, false, true, false]
        );
        // Nothing changed: the earlier answer stands, read with one seek
        // per run of holes.
        let now = memory.holes();
        assert_eq!(memory.holes_since(&now), now);
    }
}
