//! How a destination agrees with a source on the templates, for both
//! migration tools: it offers its whole catalog, or, when the source can
//! list the VM's distinct contents ([`crate::transport::query`]), answers
//! which of those it can rebuild: from this host's catalogs and VMs, or
//! from the site store ([`super::site`]), every fetched page checked
//! against its hash. The [`Agreed`] templates are then looked up by the
//! index the pages arrive with.

use std::time::{Duration, Instant};

use super::{site::SiteStore, store::TemplateStore};
use crate::{
    api::report::SiteFetch,
    config::SiteStoreConfig,
    content::{TemplateId, zero_page_hash},
    page::PAGE_SIZE,
};

/// The longest the site store may take to deliver one migration's pages;
/// what it has not delivered by then is sent in full.
const SITE_FETCH_DEADLINE: Duration = Duration::from_secs(30);

/// How a destination agrees on the templates with the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Negotiation {
    /// The cheaper of the two; asking whenever a site store is configured.
    #[default]
    Auto,
    /// Offer this host's whole catalog.
    Offer,
    /// Ask for the VM's distinct contents and answer which are held (when
    /// the source can list them; otherwise offer).
    Query,
}

impl Negotiation {
    /// Whether to ask for the `listed` contents the source can list rather
    /// than offer a catalog of `catalog` templates: 32 bytes per template
    /// offered against 32 bytes and a bit per content listed, the shorter
    /// wins, unless the site may hold what this host lacks.
    pub fn asks(self, listed: u64, catalog: usize, site: bool) -> bool {
        listed > 0
            && match self {
                Negotiation::Auto => site || catalog as u64 > listed,
                Negotiation::Offer => false,
                Negotiation::Query => true,
            }
    }
}

/// What a source lists when asked: the distinct non-zero contents among
/// `pages` (state, hash) its agent vouches for (clean or unverified), in
/// page order.
pub fn listed_contents<'a>(pages: impl Iterator<Item = (u8, &'a TemplateId)>) -> Vec<TemplateId> {
    use crate::api::wire::state;
    let zero = zero_page_hash();
    let mut seen = std::collections::HashSet::new();
    pages
        .filter(|(state, hash)| {
            matches!(*state, state::CLEAN | state::UNVERIFIED) && **hash != zero
        })
        .filter(|(_, hash)| seen.insert(**hash))
        .map(|(_, hash)| *hash)
        .collect()
}

/// The destination's templates and which of them were agreed on: the
/// page of each index the source may send.
pub struct Agreed {
    store: TemplateStore,
    /// Query: the store index of each wire index. Offer: `None`, the wire
    /// index is the store's, below `offered`.
    by_wire: Option<Vec<u32>>,
    offered: usize,
}

impl Agreed {
    /// Nothing agreed yet.
    pub fn new(store: TemplateStore) -> Self {
        Self {
            store,
            by_wire: None,
            offered: 0,
        }
    }

    pub fn store(&self) -> &TemplateStore {
        &self.store
    }

    /// Offers the first `max` templates (all, if fewer): their ids.
    pub fn offer(&mut self, max: usize) -> &[TemplateId] {
        let ids = self.store.ids();
        if ids.len() > max {
            log::warn!(
                "offering the first {max} of {} templates: one offer holds no more; \
                 install fewer or smaller catalogs",
                ids.len()
            );
        }
        self.by_wire = None;
        self.offered = ids.len().min(max);
        &ids[..self.offered]
    }

    /// Starts answering a query, the site store (if `site` names one)
    /// connected on the first answer.
    pub fn query<'a>(&'a mut self, site: &'a SiteStoreConfig) -> Answers<'a> {
        self.by_wire = Some(Vec::new());
        Answers {
            agreed: self,
            site,
            store: None,
            deadline: Instant::now() + SITE_FETCH_DEADLINE,
            fetch: None,
        }
    }

    /// How many templates were agreed on.
    pub fn len(&self) -> usize {
        self.by_wire.as_ref().map_or(self.offered, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The page behind wire index `index`, if it was agreed on.
    pub fn page(&self, index: u32) -> Option<&[u8; PAGE_SIZE]> {
        let stored = match &self.by_wire {
            Some(by_wire) => *by_wire.get(index as usize)?,
            None if (index as usize) < self.offered => index,
            None => return None,
        };
        self.store.page(stored)
    }
}

/// A query being answered ([`Agreed::query`]).
pub struct Answers<'a> {
    agreed: &'a mut Agreed,
    site: &'a SiteStoreConfig,
    /// Connected on the first answer that needs it; `Err` once it failed.
    store: Option<Result<SiteStore, ()>>,
    deadline: Instant,
    fetch: Option<SiteFetch>,
}

impl Answers<'_> {
    /// Which of `hashes` this destination can rebuild: held by this host,
    /// or fetched from the site store and checked. Each one held takes the
    /// next wire index.
    pub fn holds(&mut self, hashes: &[TemplateId]) -> Vec<bool> {
        let store = &self.agreed.store;
        let mut held: Vec<Option<u32>> = hashes.iter().map(|hash| store.index_of(hash)).collect();
        let deadline = self.deadline;
        if held.iter().any(Option::is_none)
            && let Some(site) = self.site_store()
        {
            let missing: Vec<usize> = (0..hashes.len()).filter(|i| held[*i].is_none()).collect();
            let wanted: Vec<TemplateId> = missing.iter().map(|i| hashes[*i]).collect();
            let started = Instant::now();
            let fetched = site.fetch_pages(&wanted, deadline);
            let report = self.fetch.get_or_insert_with(SiteFetch::default);
            report.asked += wanted.len() as u64;
            report.bytes += fetched.bytes;
            report.missing += fetched.missing;
            report.failed += fetched.failed + fetched.late;
            report.from_replicas |= fetched.from_replicas;
            for (i, page) in missing.into_iter().zip(fetched.pages) {
                let Some(page) = page else { continue };
                // Checked against its hash by the fetch; a repeat in the
                // source's list is found by id.
                self.agreed.store.add_page(&page);
                held[i] = self.agreed.store.index_of(&hashes[i]);
                report.pages += u64::from(held[i].is_some());
            }
            report.seconds += started.elapsed().as_secs_f64();
        }
        let by_wire = self.agreed.by_wire.get_or_insert_with(Vec::new);
        by_wire.extend(held.iter().flatten());
        held.iter().map(Option::is_some).collect()
    }

    fn site_store(&mut self) -> Option<&mut SiteStore> {
        if self.site.nodes.is_empty() {
            return None;
        }
        let store = self.store.get_or_insert_with(|| {
            let started = Instant::now();
            SiteStore::connect(self.site).map_err(|err| {
                log::warn!("{err:#}: the site's templates are not used for this migration");
                self.fetch = Some(SiteFetch {
                    error: Some(format!("{err:#}")),
                    seconds: started.elapsed().as_secs_f64(),
                    ..SiteFetch::default()
                });
            })
        });
        store.as_mut().ok()
    }

    /// What the site store delivered (`None`: none was configured).
    pub fn finish(self) -> Option<SiteFetch> {
        if let (Some(fetch), Some(Ok(store))) = (&self.fetch, &self.store) {
            log::info!(
                "site store: {} of {} pages fetched ({} missing, {} failed) in {:.2} s; {} commands",
                fetch.pages,
                fetch.asked,
                fetch.missing,
                fetch.failed,
                fetch.seconds,
                store.traffic.commands
            );
        }
        if self.site.nodes.is_empty() {
            return None;
        }
        Some(self.fetch.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::state;

    fn page(byte: u8) -> [u8; PAGE_SIZE] {
        [byte; PAGE_SIZE]
    }

    fn store_of(bytes: std::ops::RangeInclusive<u8>) -> TemplateStore {
        let mut store = TemplateStore::default();
        for byte in bytes {
            store.add_page(&page(byte));
        }
        store
    }

    fn id(byte: u8) -> TemplateId {
        *blake3::hash(&page(byte)).as_bytes()
    }

    #[test]
    fn an_offer_agrees_on_its_prefix_and_nothing_past_it() {
        let mut agreed = Agreed::new(store_of(1..=3));
        assert_eq!(agreed.offer(2), &[id(1), id(2)]);
        assert_eq!(agreed.len(), 2);
        assert_eq!(agreed.page(1), Some(&page(2)));
        assert_eq!(agreed.page(2), None, "not offered");
    }

    #[test]
    fn a_query_numbers_the_held_contents_in_the_order_asked() {
        let mut agreed = Agreed::new(store_of(1..=3));
        let none = SiteStoreConfig::default();
        let mut answers = agreed.query(&none);
        assert_eq!(answers.holds(&[id(3), id(9), id(1)]), [true, false, true]);
        assert_eq!(answers.holds(&[id(2)]), [true]);
        assert!(answers.finish().is_none(), "no site store configured");
        assert_eq!(agreed.len(), 3);
        assert_eq!(
            [
                agreed.page(0),
                agreed.page(1),
                agreed.page(2),
                agreed.page(3)
            ],
            [Some(&page(3)), Some(&page(1)), Some(&page(2)), None]
        );
    }

    #[test]
    fn the_choice_goes_by_list_lengths_unless_told() {
        assert!(!Negotiation::Auto.asks(100, 50, false));
        assert!(Negotiation::Auto.asks(100, 500, false));
        assert!(Negotiation::Auto.asks(100, 0, true));
        assert!(!Negotiation::Auto.asks(0, 500, true), "nothing to list");
        assert!(Negotiation::Query.asks(1, 0, false));
        assert!(!Negotiation::Offer.asks(100, 500, true));
    }

    #[test]
    fn the_list_holds_each_vouched_non_zero_content_once() {
        let zero = zero_page_hash();
        let pages = [
            (state::CLEAN, id(1)),
            (state::UNVERIFIED, id(2)),
            (state::CLEAN, id(1)),
            (state::UNKNOWN, id(3)),
            (state::CLEAN, zero),
        ];
        assert_eq!(
            listed_contents(pages.iter().map(|(s, h)| (*s, h))),
            [id(1), id(2)]
        );
    }
}
