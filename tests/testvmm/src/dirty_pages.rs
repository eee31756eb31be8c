//! The set of guest pages the dirty log reported since the last harvest.
//!
//! Under KVM's instruction emulator every emulated write pushes a ring entry,
//! so a `rep movsd` page yields 1024 entries; the set turns them back into
//! pages, so a harvest reports each written page once.

/// A bitmap over the guest RAM pages.
#[derive(Debug)]
pub struct DirtyPages {
    words: Vec<u64>,
    pages: u64,
    count: u64,
}

impl DirtyPages {
    pub fn new(pages: u32) -> Self {
        Self {
            words: vec![0; (pages as usize).div_ceil(64)],
            pages: u64::from(pages),
            count: 0,
        }
    }

    /// Marks `page`; pages outside RAM are ignored.
    pub fn insert(&mut self, page: u64) {
        if page >= self.pages {
            return;
        }
        let word = &mut self.words[(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        if *word & bit == 0 {
            *word |= bit;
            self.count += 1;
        }
    }

    /// Marks `first + i` for every bit `i` set in a KVM dirty bitmap.
    pub fn insert_bitmap(&mut self, first: u64, bitmap: &[u64]) {
        for (index, &word) in bitmap.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let bit = u64::from(rest.trailing_zeros());
                self.insert(first + index as u64 * 64 + bit);
                rest &= rest - 1;
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The marked pages in ascending order; the set is empty afterwards.
    pub fn drain(&mut self) -> Vec<u64> {
        let mut pages = Vec::with_capacity(self.count as usize);
        for (index, word) in self.words.iter_mut().enumerate() {
            let mut rest = std::mem::take(word);
            while rest != 0 {
                pages.push(index as u64 * 64 + u64::from(rest.trailing_zeros()));
                rest &= rest - 1;
            }
        }
        self.count = 0;
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_page_once_and_drains_in_order() {
        let mut set = DirtyPages::new(200);
        for page in [5, 130, 5, 64, 199, 200, 1000] {
            set.insert(page);
        }
        assert_eq!(
            set.len(),
            4,
            "duplicates and out-of-RAM pages are not counted"
        );
        set.insert_bitmap(128, &[0b101]);
        assert_eq!(set.drain(), vec![5, 64, 128, 130, 199]);
        assert!(set.is_empty());
        assert_eq!(set.drain(), Vec::<u64>::new());
    }
}
