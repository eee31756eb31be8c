//! Guest memory of a VMM process, read (and written) from outside it.
//!
//! Two ways, chosen per slot:
//! - **mapped** ([`GuestMapping`]): when the slot lives in a sealed memfd
//!   (QEMU's `memory-backend-memfd`, pagefp's test VMM), the same file is
//!   mapped through `/proc/PID/map_files` and read in place, without a copy
//!   (read-write, for the destination of a migration).
//! - **copied**: `process_vm_readv`, for anonymous memory. A VMM that exits
//!   mid-read makes the read fail (ESRCH/EFAULT), never the agent.

use std::{
    fs::{File, OpenOptions},
    io,
    num::NonZeroUsize,
    os::fd::AsFd,
    ptr::NonNull,
};

use nix::{
    fcntl::{FcntlArg, SealFlag, fcntl},
    sys::{
        mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap, munmap},
        uio::{RemoteIoVec, process_vm_readv},
    },
    unistd::Pid,
};

use crate::{page::PAGE_SIZE, procfs};

/// A view of guest memory `[uaddr, uaddr+size)` of a VMM process, mapped
/// from the very file the VMM maps it from (through `/proc/PID/map_files`):
/// read-only for the agent's hashing and a migration's source, read-write
/// for a migration's destination.
#[derive(Debug)]
pub struct GuestMapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    /// The mapped file and where the region starts in it: where holes are
    /// punched and found.
    file: Option<(File, u64)>,
}

// SAFETY: the mapping is memory owned by this struct; shared access only
// reads (writes need `&mut self`), so sharing the pointer between threads is
// sound.
unsafe impl Send for GuestMapping {}
// SAFETY: as above.
unsafe impl Sync for GuestMapping {}

impl GuestMapping {
    /// Maps `[uaddr, uaddr+size)` of process `pid` read-only if it is backed
    /// by a sealed shared file; `Ok(None)` if it is not (use [`read_copied`]).
    /// Only sealed files (`F_SEAL_SHRINK`) are mapped: the VMM cannot
    /// truncate them under the agent (which would raise SIGBUS).
    pub fn open_sealed(pid: u32, uaddr: u64, size: u64) -> io::Result<Option<Self>> {
        let Some(mapping) = shared_file_mapping(pid, uaddr, size)? else {
            return Ok(None);
        };
        let Ok(file) = File::open(mapping.map_file(pid)) else {
            return Ok(None);
        };
        let seals = match fcntl(file.as_fd(), FcntlArg::F_GET_SEALS) {
            Ok(bits) => SealFlag::from_bits_truncate(bits),
            Err(_) => return Ok(None),
        };
        if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            return Ok(None);
        }
        let offset = mapping.offset + (uaddr - mapping.start);
        if offset + size > file.metadata()?.len() {
            return Ok(None);
        }
        let mut mapped = Self::map(&file, offset, size, false, MapFlags::empty())?;
        mapped.file = Some((file, offset));
        Ok(Some(mapped))
    }

    /// Maps `[uaddr, uaddr+size)` of process `pid` read-write: the memory of
    /// an incoming VM that a migration fills. The range must be a shared
    /// file mapping of the VMM (a memfd or a file backend).
    pub fn open_writable(pid: u32, uaddr: u64, size: u64) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let mapping = shared_file_mapping(pid, uaddr, size)
            .with_context(|| format!("reading /proc/{pid}/maps: is the VMM running?"))?
            .with_context(|| {
                format!(
                    "guest memory of VMM pid {pid} at {uaddr:#x} is not a shared file mapping; \
                     the destination VMM must keep guest memory in a memfd"
                )
            })?;
        let path = mapping.map_file(pid);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {path} read-write (run as root)"))?;
        let offset = mapping.offset + (uaddr - mapping.start);
        let mut mapped = Self::map(&file, offset, size, true, MapFlags::empty())
            .with_context(|| format!("mapping {path}"))?;
        mapped.file = Some((file, offset));
        Ok(mapped)
    }

    /// Zeroes pages `[first, first+count)` of a writable mapping by freeing
    /// their backing (`MADV_REMOVE`: the file gets a hole, which reads as
    /// zeros in every mapping of it, the VMM's too) rather than writing
    /// zeros: a zero page costs no memory and no page fault. False when
    /// the range is outside the region or the file system cannot (nothing
    /// changed then: write the zeros).
    pub fn discard(&mut self, first: u32, count: u32) -> bool {
        let start = first as usize * PAGE_SIZE;
        let len = count as usize * PAGE_SIZE;
        if !self.writable || count == 0 || start.checked_add(len).is_none_or(|end| end > self.len) {
            return false;
        }
        // SAFETY: a page-aligned range inside this writable shared mapping
        // (checked above); `&mut self` makes this the only access from
        // this process. Freeing the backing only makes the pages read as
        // zeros, which is what the caller asks for.
        unsafe { madvise(self.ptr.add(start).cast(), len, MmapAdvise::MADV_REMOVE) }.is_ok()
    }

    /// Writes `pages` (each [`PAGE_SIZE`] bytes) at pages `first`, `first +
    /// 1`, ... of a writable region through its file (`pwritev`) rather
    /// than the mapping: the kernel fills a fresh page of the file from
    /// the data without zeroing it first, and this process gets no page
    /// fault and no page-table entry to tear down later (measured alone
    /// on a fresh 256 MiB memfd: 1.6–2.1 µs per page in runs of 64,
    /// through the mapping 3.5–3.9 µs and 10–13 ms to unmap). What a
    /// short write leaves is copied through the mapping. False when the
    /// range is outside the region or the region is read-only.
    pub fn write_pages(&mut self, first: u32, pages: &[&[u8]]) -> bool {
        let start = first as usize * PAGE_SIZE;
        let len = pages.len() * PAGE_SIZE;
        if !self.writable
            || pages.iter().any(|page| page.len() != PAGE_SIZE)
            || start.checked_add(len).is_none_or(|end| end > self.len)
        {
            return false;
        }
        let mut written = 0usize;
        if let Some((file, offset)) = &self.file {
            let slices: Vec<io::IoSlice<'_>> = pages.iter().map(|p| io::IoSlice::new(p)).collect();
            while written < len && written.is_multiple_of(PAGE_SIZE) {
                let at = (written / PAGE_SIZE).min(slices.len());
                match nix::sys::uio::pwritev(
                    file.as_fd(),
                    &slices[at..],
                    (*offset + (start + written) as u64) as i64,
                ) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => written += n,
                }
            }
        }
        // Whole pages the file did not take (none, normally), and the
        // rest of a page it took only in part.
        let done = written / PAGE_SIZE;
        for (index, page) in pages.iter().enumerate().skip(done) {
            let Some(bytes) = self.page_mut(first + index as u32) else {
                return false;
            };
            bytes.copy_from_slice(page);
        }
        true
    }

    /// A second, read-only mapping of the same file range: for a thread
    /// that reads the memory back while this one writes it.
    pub fn read_only_view(&self) -> io::Result<Self> {
        let (file, offset) = self.file.as_ref().ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "the mapping keeps no file")
        })?;
        let file = file.try_clone()?;
        let mut view = Self::map(&file, *offset, self.len as u64, false, MapFlags::empty())?;
        view.file = Some((file, *offset));
        Ok(view)
    }

    /// [`Self::drop_page_tables`] for the pages `pages` only (clipped to
    /// the region).
    pub fn drop_page_tables_in(&self, pages: std::ops::Range<u32>) {
        self.advise(pages, MmapAdvise::MADV_DONTNEED);
    }

    /// Drops this process's page-table entries for the region (the bytes
    /// stay in the file, and a later access maps them again): what
    /// reading it back mapped is then not left for the final unmap, which
    /// a destination does while its VM is paused.
    pub fn drop_page_tables(&self) {
        self.drop_page_tables_in(0..(self.len / PAGE_SIZE) as u32);
    }

    /// Maps the pages `pages` (clipped to the region) into this process's
    /// page tables at once: one call instead of a fault per 16 pages as
    /// they are read. Only for pages about to be read anyway (a hole among
    /// them is allocated, as reading it would). Best effort: it changes no
    /// byte.
    pub fn populate(&self, pages: std::ops::Range<u32>) {
        self.advise(pages, MmapAdvise::MADV_POPULATE_READ);
    }

    /// Maps the pages that hold data into this process's page tables, all
    /// at once (far cheaper than a fault per 16 pages when they are first
    /// read), leaving holes alone: reading them would allocate memory the
    /// guest never used. Nothing when the file system does not say where
    /// its holes are. Best effort: it changes no byte.
    pub fn populate_data(&self) {
        let pages = (self.len / PAGE_SIZE) as u32;
        for extent in self.data_extents(0..pages).unwrap_or_default() {
            self.populate(extent);
        }
    }

    /// `advice` for the pages `pages`, clipped to the region: only
    /// `MADV_DONTNEED` (on this shared file mapping it only unmaps; the
    /// bytes stay in the file, which later reads map again) and
    /// `MADV_POPULATE_READ` (it only faults pages in), neither of which
    /// changes a byte. Best effort.
    fn advise(&self, pages: std::ops::Range<u32>, advice: MmapAdvise) {
        debug_assert!(matches!(
            advice,
            MmapAdvise::MADV_DONTNEED | MmapAdvise::MADV_POPULATE_READ
        ));
        let end = (pages.end as usize).min(self.len / PAGE_SIZE);
        let start = (pages.start as usize).min(end);
        if start == end {
            return;
        }
        // SAFETY: a range inside this live mapping; either advice (above)
        // changes no byte of it, and no reference into it is invalidated
        // (the pages read the same afterwards).
        let _ = unsafe {
            madvise(
                self.ptr.add(start * PAGE_SIZE).cast(),
                (end - start) * PAGE_SIZE,
                advice,
            )
        };
    }

    /// Which pages of the region lie in a hole of its file (they read as
    /// zeros without being read, and reading them through a shared
    /// mapping would allocate them), from `SEEK_DATA`/`SEEK_HOLE`; `None`
    /// when the file system does not say.
    pub fn holes(&self) -> Option<Vec<bool>> {
        let pages = (self.len / PAGE_SIZE) as u32;
        let mut holes = vec![true; pages as usize];
        for extent in self.data_extents(0..pages)? {
            holes[extent.start as usize..extent.end as usize].fill(false);
        }
        Some(holes)
    }

    /// [`Self::holes`] of the pages `pages` only (inside the region).
    pub fn holes_in(&self, pages: std::ops::Range<u32>) -> Option<Vec<bool>> {
        if pages.start > pages.end || pages.end as usize > self.len / PAGE_SIZE {
            return None;
        }
        let mut holes = vec![true; (pages.end - pages.start) as usize];
        for extent in self.data_extents(pages.clone())? {
            holes[(extent.start - pages.start) as usize..(extent.end - pages.start) as usize]
                .fill(false);
        }
        Some(holes)
    }

    /// Whether the pages `pages` (all inside the region) lie in one hole of
    /// the file: one `SEEK_DATA`, which skips holes cheaply (unlike
    /// `SEEK_HOLE`, which walks the data after it). False when not known.
    pub fn is_hole(&self, pages: std::ops::Range<u32>) -> bool {
        use nix::unistd::{Whence, lseek};
        let Some((file, offset)) = self.file.as_ref() else {
            return false;
        };
        if pages.start >= pages.end || pages.end as usize > self.len / PAGE_SIZE {
            return false;
        }
        let page = PAGE_SIZE as u64;
        let (start, end) = (
            offset + u64::from(pages.start) * page,
            offset + u64::from(pages.end) * page,
        );
        match lseek(file.as_fd(), start as i64, Whence::SeekData) {
            Ok(data) => data as u64 >= end,
            // No data from `start` to the end of the file.
            Err(nix::errno::Errno::ENXIO) => true,
            Err(_) => false,
        }
    }

    /// The runs of pages within `pages` that hold data (a page holding
    /// any data byte counts), in order; `None` when the file system does
    /// not say (or the mapping keeps no file).
    fn data_extents(&self, pages: std::ops::Range<u32>) -> Option<Vec<std::ops::Range<u32>>> {
        use nix::unistd::{Whence, lseek};
        let (file, offset) = self.file.as_ref()?;
        let page = PAGE_SIZE as u64;
        let end = offset + u64::from(pages.end) * page;
        let mut at = offset + u64::from(pages.start) * page;
        let mut extents = Vec::new();
        while at < end {
            let data = match lseek(file.as_fd(), at as i64, Whence::SeekData) {
                Ok(data) => data as u64,
                // No data from `at` to the end of the file.
                Err(nix::errno::Errno::ENXIO) => break,
                Err(_) => return None,
            };
            if data >= end {
                break;
            }
            let hole = (lseek(file.as_fd(), data as i64, Whence::SeekHole).ok()? as u64).min(end);
            let first = ((data - offset) / page) as u32;
            let last = ((hole - offset).div_ceil(page) as u32).min(pages.end);
            extents.push(first..last);
            at = hole.max(data + 1);
        }
        Some(extents)
    }

    fn map(
        file: &File,
        offset: u64,
        size: u64,
        writable: bool,
        extra: MapFlags,
    ) -> io::Result<Self> {
        let len = NonZeroUsize::new(size as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty guest region"))?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a file we hold open, at a range
        // the VMM itself maps; VMMs seal their memfds against shrinking (and
        // `open_sealed` checks the seal).
        let ptr = unsafe {
            mmap(
                None,
                len,
                prot,
                MapFlags::MAP_SHARED | extra,
                file.as_fd(),
                offset as i64,
            )
        }
        .map_err(io::Error::from)?;
        Ok(Self {
            ptr: ptr.cast(),
            len: size as usize,
            writable,
            file: None,
        })
    }

    fn page_ptr(&self, page: u32) -> Option<NonNull<u8>> {
        let start = page as usize * PAGE_SIZE;
        (start + PAGE_SIZE <= self.len).then(|| {
            // SAFETY: in bounds of the mapping, checked above.
            unsafe { self.ptr.add(start) }
        })
    }

    /// Every byte of the region.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes and lives as long as
        // self; see `page` on concurrent guest writes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Every byte of the region, writable; `None` if mapped read-only.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        // SAFETY: a writable mapping of `len` bytes; `&mut self` makes this
        // the only access from this process.
        self.writable
            .then(|| unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) })
    }

    /// The bytes of page `page` of the region.
    pub fn page(&self, page: u32) -> Option<&[u8]> {
        // SAFETY: in bounds of a live mapping; a running guest may change the
        // bytes concurrently, which is fine for u8 reads (the registry's
        // generations discard hashes of pages written meanwhile).
        self.page_ptr(page)
            .map(|p| unsafe { std::slice::from_raw_parts(p.as_ptr(), PAGE_SIZE) })
    }

    /// The bytes of page `page`, writable; `None` outside the region or if
    /// it was mapped read-only.
    pub fn page_mut(&mut self, page: u32) -> Option<&mut [u8]> {
        if !self.writable {
            return None;
        }
        // SAFETY: in bounds of a live writable mapping; `&mut self` makes
        // this the only access from this process.
        self.page_ptr(page)
            .map(|p| unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), PAGE_SIZE) })
    }
}

impl Drop for GuestMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping made in `map`, unmapped once.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// The shared file mapping of `pid` that covers `[uaddr, uaddr+size)`, if
/// the mapping covering it is one.
fn shared_file_mapping(pid: u32, uaddr: u64, size: u64) -> io::Result<Option<procfs::Mapping>> {
    Ok(procfs::maps(pid)?
        .into_iter()
        .find(|m| m.covers(uaddr, size))
        .filter(procfs::Mapping::is_shared_file))
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

#[cfg(test)]
pub(crate) mod tests {
    use std::{ffi::CString, os::fd::OwnedFd};

    use nix::{
        sys::memfd::{MFdFlags, memfd_create},
        unistd::ftruncate,
    };

    use super::*;

    /// What a VMM does: guest RAM in a memfd (sealed or not), mapped shared.
    pub(crate) struct VmmRam {
        _fd: OwnedFd,
        ptr: NonNull<u8>,
        len: usize,
    }

    impl VmmRam {
        pub(crate) fn new(pages: usize, sealed: bool) -> Self {
            let len = pages * PAGE_SIZE;
            let name = CString::new("pagefp-test-ram").unwrap();
            let fd = memfd_create(name.as_c_str(), MFdFlags::MFD_ALLOW_SEALING).unwrap();
            ftruncate(&fd, len as i64).unwrap();
            if sealed {
                fcntl(fd.as_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
            }
            // SAFETY: a fresh shared mapping of a file of exactly `len` bytes.
            let ptr = unsafe {
                mmap(
                    None,
                    NonZeroUsize::new(len).unwrap(),
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_SHARED,
                    fd.as_fd(),
                    0,
                )
            }
            .unwrap();
            Self {
                _fd: fd,
                ptr: ptr.cast(),
                len,
            }
        }

        pub(crate) fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping made in `new`, alive as long as `self`.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
        }

        pub(crate) fn uaddr(&self) -> u64 {
            self.ptr.as_ptr() as u64
        }

        /// Frees page `page` (a hole again, as a balloon or a discard does).
        pub(crate) fn punch(&mut self, page: usize) {
            // SAFETY: one page inside the mapping made in `new`.
            unsafe {
                nix::sys::mman::madvise(
                    self.ptr.add(page * PAGE_SIZE).cast(),
                    PAGE_SIZE,
                    nix::sys::mman::MmapAdvise::MADV_REMOVE,
                )
            }
            .unwrap();
        }
    }

    impl Drop for VmmRam {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, unmapped once.
            let _ = unsafe { munmap(self.ptr.cast(), self.len) };
        }
    }

    #[test]
    fn guest_ram_in_a_memfd_is_mapped_read_only_and_read_write() {
        let pid = std::process::id();
        let mut ram = VmmRam::new(4, true);
        ram.bytes()[PAGE_SIZE..2 * PAGE_SIZE].fill(7);
        // A slot that starts one page into the mapping.
        let uaddr = ram.uaddr() + PAGE_SIZE as u64;
        let size = 3 * PAGE_SIZE as u64;
        let view = GuestMapping::open_sealed(pid, uaddr, size)
            .unwrap()
            .expect("a sealed memfd is mapped");
        assert!(view.page(0).unwrap().iter().all(|b| *b == 7));
        assert!(view.page(1).unwrap().iter().all(|b| *b == 0));
        assert!(view.page(3).is_none(), "outside the slot");
        let mut ro = GuestMapping::open_sealed(pid, uaddr, size)
            .unwrap()
            .unwrap();
        assert!(ro.page_mut(0).is_none(), "a read-only view is not writable");

        let mut dest = GuestMapping::open_writable(pid, uaddr, size).unwrap();
        dest.page_mut(2).unwrap().fill(9);
        assert!(ram.bytes()[3 * PAGE_SIZE..].iter().all(|b| *b == 9));
        assert!(
            view.page(2).unwrap().iter().all(|b| *b == 9),
            "the same file"
        );
    }

    /// Pages written through the file land where the VMM's own mapping
    /// (and any other view) reads them, at the slot's offset in the file;
    /// a range past the slot or a read-only view writes nothing.
    #[test]
    fn pages_written_through_the_file_are_what_the_vmm_reads() {
        let pid = std::process::id();
        let mut ram = VmmRam::new(6, true);
        // A slot that starts two pages into the mapping.
        let uaddr = ram.uaddr() + 2 * PAGE_SIZE as u64;
        let size = 4 * PAGE_SIZE as u64;
        let mut dest = GuestMapping::open_writable(pid, uaddr, size).unwrap();
        let (a, b) = ([3u8; PAGE_SIZE], [4u8; PAGE_SIZE]);
        assert!(dest.write_pages(1, &[&a, &b]));
        let bytes = ram.bytes();
        assert!(bytes[..3 * PAGE_SIZE].iter().all(|x| *x == 0));
        assert!(bytes[3 * PAGE_SIZE..4 * PAGE_SIZE].iter().all(|x| *x == 3));
        assert!(bytes[4 * PAGE_SIZE..5 * PAGE_SIZE].iter().all(|x| *x == 4));
        assert!(bytes[5 * PAGE_SIZE..].iter().all(|x| *x == 0));
        assert!(
            dest.page(2).unwrap().iter().all(|x| *x == 4),
            "its own view too"
        );

        assert!(!dest.write_pages(3, &[&a, &b]), "past the slot");
        assert!(!dest.write_pages(0, &[&a[..100]]), "not a page");
        assert!(ram.bytes()[5 * PAGE_SIZE..].iter().all(|x| *x == 0));
        let mut ro = GuestMapping::open_sealed(pid, uaddr, size)
            .unwrap()
            .unwrap();
        assert!(
            !ro.write_pages(0, &[&a]),
            "a read-only view is not writable"
        );
        assert!(
            ram.bytes()[2 * PAGE_SIZE..3 * PAGE_SIZE]
                .iter()
                .all(|x| *x == 0)
        );
    }

    /// A destination's zero pages are holes, not written zeros: the VMM
    /// reads zeros, the file holds no memory for them, and `holes` finds
    /// them (and only them) without reading.
    #[test]
    fn zeroed_pages_become_holes_that_are_found_without_reading() {
        let pid = std::process::id();
        let mut ram = VmmRam::new(16, true);
        let (uaddr, size) = (ram.uaddr(), 16 * PAGE_SIZE as u64);
        let mut dest = GuestMapping::open_writable(pid, uaddr, size).unwrap();
        let untouched = dest.holes().expect("a memfd tells its holes");
        assert!(
            untouched.iter().all(|hole| *hole),
            "a fresh memfd is all holes"
        );
        for page in [2, 3, 4, 9] {
            dest.page_mut(page).unwrap().fill(5);
        }
        let holes = dest.holes().unwrap();
        let data: Vec<usize> = (0..16).filter(|p| !holes[*p]).collect();
        assert_eq!(data, [2, 3, 4, 9]);
        assert!(dest.discard(3, 2), "shmem frees pages");
        let holes = dest.holes().unwrap();
        let data: Vec<usize> = (0..16).filter(|p| !holes[*p]).collect();
        assert_eq!(data, [2, 9]);
        // (Reading a hole of a shared memfd fills it again: checked last.)
        assert!(
            ram.bytes()[3 * PAGE_SIZE..5 * PAGE_SIZE]
                .iter()
                .all(|b| *b == 0)
        );
        assert!(
            ram.bytes()[2 * PAGE_SIZE..3 * PAGE_SIZE]
                .iter()
                .all(|b| *b == 5)
        );
        assert!(!dest.discard(15, 2), "past the region");
        let view = GuestMapping::open_sealed(pid, uaddr, size)
            .unwrap()
            .unwrap();
        assert_eq!(
            view.holes(),
            dest.holes(),
            "a read-only view finds them too"
        );
        assert!(view.is_hole(10..15) && view.is_hole(10..16));
        assert!(!view.is_hole(15..99), "past the region");
        assert!(!view.is_hole(8..10) && !view.is_hole(9..10));
    }

    #[test]
    fn unsealed_or_anonymous_memory_is_not_mapped() {
        let pid = std::process::id();
        let ram = VmmRam::new(2, false);
        let size = 2 * PAGE_SIZE as u64;
        assert!(
            GuestMapping::open_sealed(pid, ram.uaddr(), size)
                .unwrap()
                .is_none()
        );
        let anonymous = vec![1u8; 4 * PAGE_SIZE];
        let at = (anonymous.as_ptr() as u64).next_multiple_of(PAGE_SIZE as u64);
        assert!(
            GuestMapping::open_sealed(pid, at, PAGE_SIZE as u64)
                .unwrap()
                .is_none()
        );
        let err = GuestMapping::open_writable(pid, at, PAGE_SIZE as u64).unwrap_err();
        assert!(
            format!("{err:#}").contains("must keep guest memory in a memfd"),
            "{err:#}"
        );
        // A range that runs past the mapping is not covered by it.
        assert!(
            GuestMapping::open_sealed(pid, ram.uaddr(), 3 * size)
                .unwrap()
                .is_none()
        );
    }

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
}
