//! Which pages travel as references: the proxies' view of templates, kept
//! behind two small traits so where templates come from (catalog files,
//! the local agent, later the shared migration catalogs) stays pluggable.
//!
//! Both sides go by content: the sender hashes (blake3) the page bytes it
//! reads in QEMU's stream and replaces a page only when that hash is one the
//! receiver offered; the receiver offers only pages whose blake3 it checked
//! itself. Nothing the agent believes about guest memory is trusted.

use std::collections::HashMap;

use crate::{content::TemplateId, migrate::catalog::Catalog, qemu_stream::format::PAGE_SIZE};

/// Sender side: the template index of a page content, by its blake3.
pub trait TemplateLookup {
    fn template(&self, hash: &TemplateId) -> Option<u32>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Receiver side: the pages behind the indices it offers.
pub trait TemplatePages {
    /// Every template's id (the blake3 of its page), in index order.
    fn hashes(&self) -> &[TemplateId];
    fn page(&self, index: u32) -> Option<&[u8; PAGE_SIZE]>;
}

/// What the receiver offered, as the sender looks it up.
#[derive(Default)]
pub struct Offered(HashMap<TemplateId, u32>);

impl Offered {
    pub fn new(hashes: &[TemplateId]) -> Self {
        let mut map = HashMap::with_capacity(hashes.len());
        for (i, hash) in hashes.iter().enumerate() {
            map.entry(*hash).or_insert(i as u32);
        }
        Self(map)
    }
}

impl TemplateLookup for Offered {
    fn template(&self, hash: &TemplateId) -> Option<u32> {
        self.0.get(hash).copied()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Template pages held in memory, each checked against its hash, without
/// repeats. The empty set is the identity: nothing is replaced.
#[derive(Default)]
pub struct PageSet {
    hashes: Vec<[u8; 32]>,
    pages: Vec<[u8; PAGE_SIZE]>,
    index: HashMap<[u8; 32], u32>,
}

impl PageSet {
    /// Adds a page (its hash computed here); false if it was there.
    pub fn add(&mut self, page: &[u8; PAGE_SIZE]) -> bool {
        let hash = *blake3::hash(page).as_bytes();
        if self.index.contains_key(&hash) || self.hashes.len() >= u32::MAX as usize {
            return false;
        }
        self.index.insert(hash, self.hashes.len() as u32);
        self.hashes.push(hash);
        self.pages.push(*page);
        true
    }

    /// Adds a catalog's pages; how many were new.
    pub fn add_catalog(&mut self, catalog: &Catalog) -> usize {
        (0..catalog.len())
            .filter(|&i| {
                let page: &[u8; PAGE_SIZE] = catalog.page(i).try_into().expect("4 KiB pages");
                self.add(page)
            })
            .count()
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

impl TemplatePages for PageSet {
    fn hashes(&self) -> &[TemplateId] {
        &self.hashes
    }

    fn page(&self, index: u32) -> Option<&[u8; PAGE_SIZE]> {
        self.pages.get(index as usize)
    }
}

impl TemplateLookup for PageSet {
    fn template(&self, hash: &TemplateId) -> Option<u32> {
        self.index.get(hash).copied()
    }

    fn len(&self) -> usize {
        self.hashes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_found_by_content_and_never_twice() {
        let mut set = PageSet::default();
        let a = [1u8; PAGE_SIZE];
        let b = [2u8; PAGE_SIZE];
        assert!(set.add(&a) && set.add(&b) && !set.add(&a));
        assert_eq!(set.len(), 2);
        let offered = Offered::new(set.hashes());
        let index = offered.template(blake3::hash(&b).as_bytes()).unwrap();
        assert_eq!(set.page(index).unwrap(), &b);
        assert_eq!(
            offered.template(blake3::hash(&[3u8; PAGE_SIZE]).as_bytes()),
            None
        );
        assert!(set.page(2).is_none());
    }
}
