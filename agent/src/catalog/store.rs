//! The one template store: the template pages a destination can rebuild
//! from, each checked against its hash, without repeats, in offer order (a
//! template's index on the wire is its place here).

use std::collections::HashMap;

use super::Catalog;
use crate::{content::TemplateId, page::PAGE_SIZE};

/// Template pages by index, and indices by id (the page's blake3 hash).
#[derive(Default)]
pub struct TemplateStore {
    ids: Vec<TemplateId>,
    pages: Vec<[u8; PAGE_SIZE]>,
    index: HashMap<TemplateId, u32>,
}

impl TemplateStore {
    /// Adds a page, its hash computed here; false if it was there already
    /// (or the store is full).
    pub fn add_page(&mut self, page: &[u8; PAGE_SIZE]) -> bool {
        self.insert(*blake3::hash(page).as_bytes(), page)
    }

    /// Adds a catalog's pages (checked against their hashes when the
    /// catalog was loaded or built); how many were new.
    pub fn add(&mut self, catalog: &Catalog) -> usize {
        catalog
            .hashes
            .iter()
            .enumerate()
            .filter(|(i, hash)| {
                let page: &[u8; PAGE_SIZE] = catalog
                    .page(*i)
                    .try_into()
                    .expect("catalog pages are PAGE_SIZE bytes");
                self.insert(**hash, page)
            })
            .count()
    }

    fn insert(&mut self, id: TemplateId, page: &[u8; PAGE_SIZE]) -> bool {
        if self.index.contains_key(&id) || self.ids.len() >= u32::MAX as usize {
            return false;
        }
        self.index.insert(id, self.ids.len() as u32);
        self.ids.push(id);
        self.pages.push(*page);
        true
    }

    /// Every template's id, in index order.
    pub fn ids(&self) -> &[TemplateId] {
        &self.ids
    }

    /// The index of the template with this id.
    pub fn index_of(&self, id: &TemplateId) -> Option<u32> {
        self.index.get(id).copied()
    }

    pub fn page(&self, index: u32) -> Option<&[u8; PAGE_SIZE]> {
        self.pages.get(index as usize)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::file::tests::catalog;

    #[test]
    fn each_template_is_kept_once_and_found_by_content() {
        let mut store = TemplateStore::default();
        assert_eq!(store.add(&catalog(3)), 3);
        assert_eq!(store.add(&catalog(4)), 1);
        assert_eq!(&store.page(3).unwrap()[..], catalog(4).page(3));
        let extra = [7u8; PAGE_SIZE];
        assert!(store.add_page(&extra) && !store.add_page(&extra));
        let index = store.index_of(blake3::hash(&extra).as_bytes()).unwrap();
        assert_eq!((index, store.page(index)), (4, Some(&extra)));
        assert_eq!(store.ids().len(), 5);
        assert_eq!(store.index_of(&[0; 32]), None);
        assert!(store.page(5).is_none());
    }
}
