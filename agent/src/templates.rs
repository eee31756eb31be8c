//! Template selection: the page contents worth holding at a destination.
//!
//! Following Li, Zheng and Hu (IC2E 2014): contents held by at least
//! `min_vms` VMs, ranked by how many pages they would save, capped by a
//! memory budget. The zero page is left out: migration encodes it on its own.

use std::collections::HashSet;

use serde::Serialize;

use crate::{
    PAGE_SIZE,
    content::{ContentId, ContentTable, PageHash, VmContentCounts, zero_page_hash},
};

/// How templates are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectionPolicy {
    pub min_vms: u32,
    pub budget_bytes: u64,
}

/// One template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Template {
    pub index: u32,
    #[serde(serialize_with = "crate::api::hex_hash")]
    pub hash: PageHash,
    /// Pages holding this content, host-wide.
    pub pages: u32,
    pub vms: u32,
}

/// The selected templates, in rank order (index = rank).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Catalog {
    /// The content-table epoch the selection was made at.
    pub epoch: u64,
    pub min_vms: u32,
    pub budget_bytes: u64,
    pub templates: Vec<Template>,
    /// Templates selected (`templates` may be cut short by `?limit=`).
    pub selected: usize,
    /// Pages covered by the templates, host-wide.
    pub pages_covered: u64,
    /// Distinct contents that were eligible (held by enough VMs).
    pub eligible: u64,
    #[serde(skip)]
    ids: HashSet<ContentId>,
}

impl Catalog {
    pub fn select(contents: &ContentTable, policy: SelectionPolicy) -> Self {
        let zero = zero_page_hash();
        let mut eligible: Vec<(ContentId, u32, u32, PageHash)> = contents
            .iter()
            .filter(|(_, info)| info.vms >= policy.min_vms && info.hash != zero)
            .map(|(id, info)| (id, info.pages, info.vms, info.hash))
            .collect();
        let total_eligible = eligible.len() as u64;
        let cap = (policy.budget_bytes / PAGE_SIZE as u64) as usize;
        let by_rank = |a: &(ContentId, u32, u32, PageHash), b: &(ContentId, u32, u32, PageHash)| {
            b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.3.cmp(&b.3))
        };
        if eligible.len() > cap {
            if cap == 0 {
                eligible.clear();
            } else {
                eligible.select_nth_unstable_by(cap - 1, by_rank);
                eligible.truncate(cap);
            }
        }
        eligible.sort_unstable_by(by_rank);
        let templates: Vec<Template> = eligible
            .iter()
            .enumerate()
            .map(|(index, (_, pages, vms, hash))| Template {
                index: index as u32,
                hash: *hash,
                pages: *pages,
                vms: *vms,
            })
            .collect();
        Self {
            epoch: contents.epoch(),
            min_vms: policy.min_vms,
            budget_bytes: policy.budget_bytes,
            pages_covered: templates.iter().map(|t| u64::from(t.pages)).sum(),
            eligible: total_eligible,
            ids: eligible.iter().map(|e| e.0).collect(),
            selected: templates.len(),
            templates,
        }
    }

    /// Pages of one VM whose content is a template.
    pub fn covered_pages(&self, vm: &VmContentCounts) -> u64 {
        vm.iter()
            .filter(|(id, _)| self.ids.contains(id))
            .map(|(_, n)| u64::from(n))
            .sum()
    }

    pub fn bytes(&self) -> u64 {
        self.templates.len() as u64 * PAGE_SIZE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_by_pages_and_honours_min_vms_budget_and_zero() {
        let mut table = ContentTable::new();
        let mut vms: Vec<VmContentCounts> = (0..3).map(|_| VmContentCounts::default()).collect();
        let zero = zero_page_hash();
        for vm in vms.iter_mut() {
            table.add_page(vm, &zero);
            table.add_page(vm, &[1; 32]);
        }
        for _ in 0..5 {
            table.add_page(&mut vms[0], &[2; 32]);
        }
        table.add_page(&mut vms[1], &[2; 32]);
        for _ in 0..9 {
            table.add_page(&mut vms[2], &[3; 32]); // one VM only
        }
        let catalog = Catalog::select(
            &table,
            SelectionPolicy {
                min_vms: 2,
                budget_bytes: 1 << 30,
            },
        );
        let hashes: Vec<PageHash> = catalog.templates.iter().map(|t| t.hash).collect();
        assert_eq!(hashes, vec![[2; 32], [1; 32]]);
        assert_eq!(catalog.templates[0].pages, 6);
        assert_eq!(catalog.pages_covered, 9);
        assert_eq!(catalog.covered_pages(&vms[0]), 6);
        let small = Catalog::select(
            &table,
            SelectionPolicy {
                min_vms: 2,
                budget_bytes: 4096,
            },
        );
        assert_eq!(small.templates.len(), 1);
        assert_eq!(small.templates[0].hash, [2; 32]);
    }
}
