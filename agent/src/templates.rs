//! Template selection: the page contents worth holding at a destination.
//!
//! Following Li, Zheng and Hu (IC2E 2014): contents held by at least
//! `min_vms` VMs, ranked by how many pages they would save, capped by a
//! memory budget. The zero page is left out: migration encodes it on its own.

use std::collections::{HashMap, HashSet};

use crate::{
    content::{ContentId, ContentTable, PageHash, VmContentCounts, zero_page_hash},
    page::PAGE_SIZE,
};

/// How templates are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelectionPolicy {
    pub min_vms: u32,
    pub budget_bytes: u64,
}

/// One template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Template {
    pub index: u32,
    pub id: ContentId,
    pub hash: PageHash,
    /// Pages holding this content, over the VMs counted.
    pub pages: u32,
    pub vms: u32,
}

/// The selected templates, in rank order (index = rank).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// The content-table epoch the selection was made at.
    pub epoch: u64,
    pub policy: SelectionPolicy,
    pub templates: Vec<Template>,
    /// Pages covered by the templates, over the VMs counted.
    pub pages_covered: u64,
    /// Distinct contents that were eligible (held by enough VMs).
    pub eligible: u64,
    ids: HashSet<ContentId>,
}

/// A content that may become a template: how many pages and VMs hold it.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: ContentId,
    pages: u32,
    vms: u32,
    hash: PageHash,
}

/// The contents eligible as templates, taken from the content table (under
/// the registry lock: one pass, no sorting) and ranked later, without it.
#[derive(Debug)]
pub struct Eligible {
    epoch: u64,
    policy: SelectionPolicy,
    candidates: Vec<Candidate>,
}

impl Eligible {
    /// Every VM of the host (the content table's counts).
    pub fn host(contents: &ContentTable, policy: SelectionPolicy) -> Self {
        let zero = zero_page_hash();
        let candidates = contents
            .iter()
            .filter(|(_, info)| info.vms >= policy.min_vms && info.hash != zero)
            .map(|(id, info)| Candidate {
                id,
                pages: info.pages,
                vms: info.vms,
                hash: info.hash,
            })
            .collect();
        Self {
            epoch: contents.epoch(),
            policy,
            candidates,
        }
    }

    /// The selection: see [`Selection::rank`].
    pub fn rank(self) -> Selection {
        Selection::rank(self.epoch, self.candidates.into_iter(), self.policy)
    }
}

impl Selection {
    /// The templates of every VM of the host (the content table's counts).
    pub fn select(contents: &ContentTable, policy: SelectionPolicy) -> Self {
        Eligible::host(contents, policy).rank()
    }

    /// The templates of some VMs only (`counts`: each chosen VM's content
    /// counts), ranked exactly as [`Selection::select`] ranks the host's.
    pub fn select_among<'a>(
        contents: &ContentTable,
        counts: impl IntoIterator<Item = &'a VmContentCounts>,
        policy: SelectionPolicy,
    ) -> Self {
        let mut totals: HashMap<ContentId, (u32, u32)> = HashMap::new();
        for vm in counts {
            for (id, n) in vm.iter() {
                let total = totals.entry(id).or_default();
                total.0 = total.0.saturating_add(n);
                total.1 += 1;
            }
        }
        let candidates = totals.into_iter().map(|(id, (pages, vms))| Candidate {
            id,
            pages,
            vms,
            hash: contents.get(id).hash,
        });
        Self::rank(contents.epoch(), candidates, policy)
    }

    /// The one ranking (Li, Zheng and Hu): contents held by at least
    /// `min_vms` VMs, by pages saved, then VMs, then hash; zero page left
    /// out; at most `budget_bytes` of pages.
    fn rank(
        epoch: u64,
        candidates: impl Iterator<Item = Candidate>,
        policy: SelectionPolicy,
    ) -> Self {
        let zero = zero_page_hash();
        let mut eligible: Vec<Candidate> = candidates
            .filter(|c| c.vms >= policy.min_vms && c.hash != zero)
            .collect();
        let total_eligible = eligible.len() as u64;
        let cap = (policy.budget_bytes / PAGE_SIZE as u64) as usize;
        let by_rank = |a: &Candidate, b: &Candidate| {
            b.pages
                .cmp(&a.pages)
                .then(b.vms.cmp(&a.vms))
                .then(a.hash.cmp(&b.hash))
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
            .map(|(index, c)| Template {
                index: index as u32,
                id: c.id,
                hash: c.hash,
                pages: c.pages,
                vms: c.vms,
            })
            .collect();
        Self {
            epoch,
            policy,
            pages_covered: templates.iter().map(|t| u64::from(t.pages)).sum(),
            eligible: total_eligible,
            ids: eligible.iter().map(|c| c.id).collect(),
            templates,
        }
    }

    /// Whether content `id` is a template.
    pub fn contains(&self, id: ContentId) -> bool {
        self.ids.contains(&id)
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
        let catalog = Selection::select(
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
        let small = Selection::select(
            &table,
            SelectionPolicy {
                min_vms: 2,
                budget_bytes: 4096,
            },
        );
        assert_eq!(small.templates.len(), 1);
        assert_eq!(small.templates[0].hash, [2; 32]);

        // Among VMs 1 and 2 only: [2] is held by VM 1 alone there; [3] by
        // VM 2 alone; [1] by both.
        let among = Selection::select_among(
            &table,
            [&vms[1], &vms[2]],
            SelectionPolicy {
                min_vms: 2,
                budget_bytes: 1 << 30,
            },
        );
        let hashes: Vec<PageHash> = among.templates.iter().map(|t| t.hash).collect();
        assert_eq!(hashes, vec![[1; 32]]);
        assert_eq!(among.templates[0].pages, 2);
        let among = Selection::select_among(
            &table,
            [&vms[1], &vms[2]],
            SelectionPolicy {
                min_vms: 1,
                budget_bytes: 1 << 30,
            },
        );
        let hashes: Vec<PageHash> = among.templates.iter().map(|t| t.hash).collect();
        assert_eq!(hashes, vec![[3; 32], [1; 32], [2; 32]]);
        // Over every VM, the two selections agree.
        let all = Selection::select_among(
            &table,
            &vms,
            SelectionPolicy {
                min_vms: 2,
                budget_bytes: 1 << 30,
            },
        );
        assert_eq!(all.templates, catalog.templates);
    }
}
