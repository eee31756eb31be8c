//! Dirty bitmaps from the kernel: the bitmap a `KVM_GET_DIRTY_LOG` returned
//! to the VMM, or the mask a `KVM_CLEAR_DIRTY_LOG` was given, copied by the
//! eBPF program at `sys_exit_ioctl` in chunks of [`BITMAP_CHUNK_PAGES`]
//! pages, each one ring-buffer record, sent before the ioctl's own
//! [`crate::Event`] (which says how many pages the chunks cover).
//!
//! A chunk is too large for the eBPF stack: the program reserves it in the
//! ring buffer, writes its [`BitmapHead`] (built by the constructors here)
//! and copies the bits straight from the VMM's memory into its `words`.
//! User space reads one only through [`BitmapChunk::decode`].

use crate::event::EventKind;

/// 64-bit words of bits per chunk (4 KiB).
pub const BITMAP_CHUNK_WORDS: usize = 512;
/// Pages one chunk covers.
pub const BITMAP_CHUNK_PAGES: u32 = (BITMAP_CHUNK_WORDS * 64) as u32;
/// Chunks one ioctl may send: bitmaps of slots (or cleared ranges) larger
/// than this many pages (64 GiB) are cut, and the pages past the cut are
/// reported as not covered.
pub const MAX_BITMAP_CHUNKS: u32 = 512;

/// Which ioctl a chunk belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapOf {
    /// The bits `KVM_GET_DIRTY_LOG` returned: pages written since they were
    /// last write-protected.
    Get,
    /// The mask `KVM_CLEAR_DIRTY_LOG` was given: pages to write-protect again.
    Clear,
}

/// The head of a [`BitmapChunk`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapHead {
    /// Always [`EventKind::DIRTY_BITMAP`].
    kind: EventKind,
    /// Process id of the VMM.
    pid: u32,
    /// When the ioctl entered the kernel (matches its event's `enter_ns`).
    enter_ns: u64,
    /// as_id << 16 | slot id.
    slot: u32,
    /// [`EventKind::DIRTY_LOG_GET`] or [`EventKind::DIRTY_LOG_CLEAR`].
    ioctl: EventKind,
    /// Page of the slot that bit 0 of `words[0]` stands for.
    first_page: u64,
    /// Bits of `words` that count (from bit 0 of `words[0]`).
    pages: u32,
    _pad: u32,
}

impl BitmapHead {
    #[inline(always)]
    const fn new(
        ioctl: EventKind,
        pid: u32,
        enter_ns: u64,
        slot: u32,
        first_page: u64,
        pages: u32,
    ) -> Self {
        Self {
            kind: EventKind::DIRTY_BITMAP,
            pid,
            enter_ns,
            slot,
            ioctl,
            first_page,
            pages,
            _pad: 0,
        }
    }

    /// Bits `first_page..first_page + pages` of the bitmap `KVM_GET_DIRTY_LOG`
    /// of `slot`, entered at `enter_ns`, returned.
    #[inline(always)]
    pub const fn get(pid: u32, enter_ns: u64, slot: u32, first_page: u64, pages: u32) -> Self {
        Self::new(
            EventKind::DIRTY_LOG_GET,
            pid,
            enter_ns,
            slot,
            first_page,
            pages,
        )
    }

    /// The mask bits for pages `first_page..first_page + pages` given to
    /// `KVM_CLEAR_DIRTY_LOG` of `slot`, entered at `enter_ns`.
    #[inline(always)]
    pub const fn clear(pid: u32, enter_ns: u64, slot: u32, first_page: u64, pages: u32) -> Self {
        Self::new(
            EventKind::DIRTY_LOG_CLEAR,
            pid,
            enter_ns,
            slot,
            first_page,
            pages,
        )
    }
}

/// One ring-buffer record of a dirty bitmap.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapChunk {
    pub head: BitmapHead,
    /// The bits, as the kernel lays them out (`unsigned long`, little endian
    /// bit order: page `first_page + 64 * i + b` is bit `b` of `words[i]`).
    pub words: [u64; BITMAP_CHUNK_WORDS],
}

/// A [`BitmapChunk`] decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyBitmap<'a> {
    pub pid: u32,
    pub of: BitmapOf,
    pub enter_ns: u64,
    pub slot: u32,
    pub first_page: u64,
    /// Bits that count; bits of `words` past them are zero.
    pub pages: u32,
    pub words: &'a [u64],
}

/// A chunk user space cannot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapError {
    NotABitmap,
    UnknownIoctl(u32),
    TooManyPages(u32),
}

impl core::fmt::Display for BitmapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotABitmap => write!(f, "eBPF record is not a dirty bitmap"),
            Self::UnknownIoctl(raw) => write!(
                f,
                "dirty bitmap of unknown ioctl kind {raw}: the agent and its eBPF object were built from different versions (rebuild and reinstall pagefp)"
            ),
            Self::TooManyPages(pages) => write!(
                f,
                "dirty bitmap chunk claims {pages} pages (at most {BITMAP_CHUNK_PAGES})"
            ),
        }
    }
}

impl BitmapChunk {
    /// The VMM's process id (not checked: see [`BitmapChunk::decode`]).
    pub fn pid(&self) -> u32 {
        self.head.pid
    }

    /// The chunk, checked: its kind, its ioctl and its page count. Bits past
    /// `pages` come back cleared, whatever the record held.
    pub fn decode(&mut self) -> Result<DirtyBitmap<'_>, BitmapError> {
        let head = self.head;
        if head.kind != EventKind::DIRTY_BITMAP {
            return Err(BitmapError::NotABitmap);
        }
        let of = match head.ioctl {
            EventKind::DIRTY_LOG_GET => BitmapOf::Get,
            EventKind::DIRTY_LOG_CLEAR => BitmapOf::Clear,
            other => return Err(BitmapError::UnknownIoctl(other.raw())),
        };
        if head.pages > BITMAP_CHUNK_PAGES {
            return Err(BitmapError::TooManyPages(head.pages));
        }
        let full = (head.pages / 64) as usize;
        let rest = head.pages % 64;
        if rest != 0 {
            self.words[full] &= (1u64 << rest) - 1;
        }
        let used = full + usize::from(rest != 0);
        for word in &mut self.words[used..] {
            *word = 0;
        }
        Ok(DirtyBitmap {
            pid: head.pid,
            of,
            enter_ns: head.enter_ns,
            slot: head.slot,
            first_page: head.first_page,
            pages: head.pages,
            words: &self.words[..used],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(head: BitmapHead) -> BitmapChunk {
        BitmapChunk {
            head,
            words: [u64::MAX; BITMAP_CHUNK_WORDS],
        }
    }

    #[test]
    fn a_chunk_decodes_with_the_bits_past_its_pages_cleared() {
        let mut get = chunk(BitmapHead::get(7, 100, 3, 32768, 70));
        let bitmap = get.decode().unwrap();
        assert_eq!(
            (
                bitmap.pid,
                bitmap.of,
                bitmap.enter_ns,
                bitmap.slot,
                bitmap.first_page
            ),
            (7, BitmapOf::Get, 100, 3, 32768)
        );
        assert_eq!(bitmap.words, &[u64::MAX, 0x3f]);
        let mut clear = chunk(BitmapHead::clear(7, 100, 3, 64, BITMAP_CHUNK_PAGES));
        let bitmap = clear.decode().unwrap();
        assert_eq!(bitmap.of, BitmapOf::Clear);
        assert_eq!(bitmap.words.len(), BITMAP_CHUNK_WORDS);
        let mut empty = chunk(BitmapHead::get(7, 100, 3, 0, 0));
        assert!(empty.decode().unwrap().words.is_empty());
    }

    #[test]
    fn chunks_that_do_not_check_are_refused() {
        let mut big = chunk(BitmapHead::get(7, 100, 3, 0, BITMAP_CHUNK_PAGES + 1));
        assert_eq!(
            big.decode(),
            Err(BitmapError::TooManyPages(BITMAP_CHUNK_PAGES + 1))
        );
        let mut other = chunk(BitmapHead::new(EventKind::SLOT_SET, 7, 1, 3, 0, 1));
        assert_eq!(
            other.decode(),
            Err(BitmapError::UnknownIoctl(EventKind::SLOT_SET.raw()))
        );
        let mut not = chunk(BitmapHead::get(7, 100, 3, 0, 1));
        not.head.kind = EventKind::SLOT_SET;
        assert_eq!(not.decode(), Err(BitmapError::NotABitmap));
    }
}
