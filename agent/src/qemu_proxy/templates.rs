//! Which pages travel as references, on the send proxy's side: the
//! templates the receive proxy agreed on (offered, or held of the VM's
//! listed contents), looked up by content. The receive proxy's side is
//! [`crate::catalog::agreement::Agreed`].
//!
//! Both sides go by content: the sender hashes (blake3) the page bytes it
//! reads in QEMU's stream and replaces a page only when that hash is one the
//! receiver agreed on; the receiver agrees only on pages whose blake3 it
//! checked itself. Nothing the agent believes about guest memory is trusted.

use std::collections::HashMap;

use crate::{catalog::store::TemplateStore, content::TemplateId};

/// Sender side: the template index of a page content, by its blake3.
pub trait TemplateLookup {
    fn template(&self, hash: &TemplateId) -> Option<u32>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the receiver agreed on, as the sender looks it up.
#[derive(Default)]
pub struct Offered(HashMap<TemplateId, u32>);

impl From<HashMap<TemplateId, u32>> for Offered {
    /// The templates of a query, by content.
    fn from(agreed: HashMap<TemplateId, u32>) -> Self {
        Self(agreed)
    }
}

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

impl TemplateLookup for TemplateStore {
    fn template(&self, hash: &TemplateId) -> Option<u32> {
        self.index_of(hash)
    }

    fn len(&self) -> usize {
        TemplateStore::len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::PAGE_SIZE;

    #[test]
    fn pages_are_found_by_content_and_never_twice() {
        let mut set = TemplateStore::default();
        let a = [1u8; PAGE_SIZE];
        let b = [2u8; PAGE_SIZE];
        assert!(set.add_page(&a) && set.add_page(&b) && !set.add_page(&a));
        assert_eq!(TemplateLookup::len(&set), 2);
        let offered = Offered::new(set.ids());
        let index = offered.template(blake3::hash(&b).as_bytes()).unwrap();
        assert_eq!(set.page(index).unwrap(), &b);
        assert_eq!(
            offered.template(blake3::hash(&[3u8; PAGE_SIZE]).as_bytes()),
            None
        );
    }
}
