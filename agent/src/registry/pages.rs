//! The state of every page of one memory slot.

use crate::content::{ContentId, ZERO_CONTENT};

/// What the agent knows about a page's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum PageState {
    /// Never hashed, or something may have been missed.
    Unknown = 0,
    /// The hash is valid: the page was read after its last write became
    /// visible to the agent and after KVM write-protected it again.
    Clean = 1,
    /// Written; the agent waits until KVM write-protects it again.
    Dirty = 2,
    /// Write-protected again; a rehash is queued.
    Queued = 3,
    /// Hashed, but the VM is not dirty-tracked: the content may have changed
    /// since. Whoever uses the hash must confirm it.
    Unverified = 4,
    /// Hashed after re-protection, in a VM whose writes are learnt from the
    /// dirty bitmaps `KVM_GET_DIRTY_LOG` returns: clean once a harvest that
    /// entered after the read shows the page unwritten. Served unverified
    /// until then.
    Confirming = 5,
}

impl PageState {
    fn from_bits(bits: u32) -> Self {
        match bits & 0x7 {
            1 => Self::Clean,
            2 => Self::Dirty,
            3 => Self::Queued,
            4 => Self::Unverified,
            5 => Self::Confirming,
            _ => Self::Unknown,
        }
    }

    /// May a hash read now be committed for a page in this state?
    pub fn wants_hash(self) -> bool {
        matches!(self, Self::Unknown | Self::Queued | Self::Unverified)
    }
}

/// No content known.
pub const NO_CONTENT: ContentId = ContentId::MAX;

/// One page: its content id and (generation << 3 | state). The generation
/// changes on every write the agent learns of, so a hash read before that
/// write is never committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry {
    pub content: ContentId,
    meta: u32,
}

impl Default for PageEntry {
    fn default() -> Self {
        Self {
            content: NO_CONTENT,
            meta: 0,
        }
    }
}

impl PageEntry {
    pub fn state(&self) -> PageState {
        PageState::from_bits(self.meta)
    }

    pub fn generation(&self) -> u32 {
        self.meta >> 3
    }

    pub fn set_state(&mut self, state: PageState) {
        self.meta = (self.meta & !0x7) | state as u32;
    }

    /// A write was reported: new generation, in `state`.
    pub fn bump(&mut self, state: PageState) -> u32 {
        let generation = self.generation().wrapping_add(1) & (u32::MAX >> 3);
        self.meta = (generation << 3) | state as u32;
        generation
    }
}

/// What the page counts of a [`PageTable`] tell apart (the API's and the
/// metrics' page states: dirty includes queued; hashed zero pages apart).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCounts {
    pub unknown: u64,
    /// Dirty or queued for a rehash.
    pub dirty: u64,
    /// Clean, not the zero page.
    pub clean: u64,
    /// Unverified (or confirming), not the zero page.
    pub unverified: u64,
    /// Clean or unverified zero pages.
    pub zero_clean: u64,
    pub zero_unverified: u64,
}

impl PageCounts {
    fn bucket(&mut self, entry: &PageEntry) -> &mut u64 {
        let zero = entry.content == ZERO_CONTENT;
        match entry.state() {
            PageState::Unknown => &mut self.unknown,
            PageState::Dirty | PageState::Queued => &mut self.dirty,
            PageState::Clean if zero => &mut self.zero_clean,
            PageState::Clean => &mut self.clean,
            PageState::Unverified | PageState::Confirming if zero => &mut self.zero_unverified,
            PageState::Unverified | PageState::Confirming => &mut self.unverified,
        }
    }

    pub fn add(&mut self, other: &PageCounts) {
        self.unknown += other.unknown;
        self.dirty += other.dirty;
        self.clean += other.clean;
        self.unverified += other.unverified;
        self.zero_clean += other.zero_clean;
        self.zero_unverified += other.zero_unverified;
    }

    pub fn total(&self) -> u64 {
        self.unknown
            + self.dirty
            + self.clean
            + self.unverified
            + self.zero_clean
            + self.zero_unverified
    }
}

/// Pages per change stamp (see [`PageTable::mark`]).
pub const STAMP_PAGES: u32 = 64;

/// The pages of one slot, with their counts by state kept as they change,
/// so that the API and a metrics scrape never walk every page under the
/// registry lock, and a change stamp per [`STAMP_PAGES`] pages, so that a
/// hash list can name only what changed since an earlier one. Pages
/// change only through its methods.
#[derive(Clone, Debug)]
pub struct PageTable {
    entries: Vec<PageEntry>,
    counts: PageCounts,
    /// Per group of [`STAMP_PAGES`] pages: `mark` when one last changed.
    stamps: Vec<u64>,
    /// What a change is stamped with now: the last [`Self::mark`].
    mark: u64,
}

impl PageTable {
    /// `pages` pages, all unknown.
    pub fn new(pages: usize) -> Self {
        Self {
            entries: vec![PageEntry::default(); pages],
            counts: PageCounts {
                unknown: pages as u64,
                ..PageCounts::default()
            },
            stamps: vec![0; pages.div_ceil(STAMP_PAGES as usize)],
            mark: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, page: u32) -> Option<&PageEntry> {
        self.entries.get(page as usize)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, PageEntry> {
        self.entries.iter()
    }

    pub fn counts(&self) -> PageCounts {
        self.counts
    }

    /// Changes page `page` with `change`, keeping the counts; `None` if
    /// there is no such page.
    pub fn update<T>(&mut self, page: u32, change: impl FnOnce(&mut PageEntry) -> T) -> Option<T> {
        let entry = self.entries.get_mut(page as usize)?;
        *self.counts.bucket(entry) -= 1;
        let result = change(entry);
        *self.counts.bucket(entry) += 1;
        self.stamps[(page / STAMP_PAGES) as usize] = self.mark;
        Some(result)
    }

    /// Starts a new period of changes and returns its mark: every page
    /// changed from now on is in [`Self::changed_since`] that mark. (Each
    /// hash list takes one; the next names what changed since.)
    pub fn mark(&mut self) -> u64 {
        self.mark += 1;
        self.mark
    }

    /// The page ranges `(first, count)`, in order, holding every page
    /// changed since [`Self::mark`] returned `since` (and, at stamp
    /// granularity, some that did not).
    pub fn changed_since(&self, since: u64) -> Vec<(u32, u32)> {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        let pages = self.entries.len() as u32;
        for (group, _) in self
            .stamps
            .iter()
            .enumerate()
            .filter(|(_, stamp)| **stamp >= since)
        {
            let first = group as u32 * STAMP_PAGES;
            let count = STAMP_PAGES.min(pages - first);
            match ranges.last_mut() {
                Some((start, len)) if *start + *len == first => *len += count,
                _ => ranges.push((first, count)),
            }
        }
        ranges
    }

    pub fn shrink_to_fit(&mut self) {
        self.entries.shrink_to_fit();
        self.stamps.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_generation_pack() {
        let mut page = PageEntry::default();
        assert_eq!((page.state(), page.generation()), (PageState::Unknown, 0));
        assert_eq!(page.bump(PageState::Dirty), 1);
        page.set_state(PageState::Queued);
        assert_eq!((page.state(), page.generation()), (PageState::Queued, 1));
        for _ in 0..(1u64 << 29) / 4096 {
            page.bump(PageState::Dirty);
        }
        assert_eq!(page.state(), PageState::Dirty);
    }

    #[test]
    fn the_table_counts_follow_every_change() {
        let mut table = PageTable::new(4);
        assert_eq!(table.counts().unknown, 4);
        table.update(0, |p| {
            p.content = ZERO_CONTENT;
            p.set_state(PageState::Clean)
        });
        table.update(1, |p| {
            p.content = 7;
            p.set_state(PageState::Unverified)
        });
        table.update(2, |p| p.bump(PageState::Queued));
        assert_eq!(table.update(9, |p| p.bump(PageState::Dirty)), None);
        let recount = |table: &PageTable| {
            let mut counts = PageCounts::default();
            for entry in table.iter() {
                *counts.bucket(entry) += 1;
            }
            counts
        };
        assert_eq!(table.counts(), recount(&table));
        assert_eq!(
            (
                table.counts().zero_clean,
                table.counts().unverified,
                table.counts().dirty
            ),
            (1, 1, 1)
        );
        table.update(0, |p| {
            p.content = NO_CONTENT;
            p.bump(PageState::Dirty)
        });
        assert_eq!(table.counts(), recount(&table));
        assert_eq!(table.counts().total(), 4);
    }

    #[test]
    fn what_changed_since_a_mark_is_named_and_nothing_else() {
        let pages = 5 * STAMP_PAGES + 3;
        let mut table = PageTable::new(pages as usize);
        let first = table.mark();
        assert_eq!(table.changed_since(first), vec![]);
        table.update(STAMP_PAGES + 1, |p| p.bump(PageState::Dirty));
        table.update(2 * STAMP_PAGES, |p| p.bump(PageState::Dirty));
        table.update(pages - 1, |p| p.bump(PageState::Dirty));
        let second = table.mark();
        assert_eq!(
            table.changed_since(first),
            vec![(STAMP_PAGES, 2 * STAMP_PAGES), (5 * STAMP_PAGES, 3)]
        );
        assert_eq!(table.changed_since(second), vec![]);
        // A change after a later mark is also named since every earlier one.
        table.update(0, |p| p.set_state(PageState::Queued));
        let third = table.mark();
        assert_eq!(table.changed_since(second), vec![(0, STAMP_PAGES)]);
        assert_eq!(table.changed_since(first)[0], (0, 3 * STAMP_PAGES));
        assert_eq!(table.changed_since(third), vec![]);
        // An update of a page beyond the table stamps nothing.
        assert_eq!(table.update(pages, |p| p.bump(PageState::Dirty)), None);
        assert_eq!(table.changed_since(third), vec![]);
        // Before any mark, every change is named since the first.
        let mut fresh = PageTable::new(8);
        fresh.update(3, |p| p.bump(PageState::Dirty));
        assert_eq!(fresh.changed_since(0), vec![(0, 8)]);
    }
}
