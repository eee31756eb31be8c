//! The daemon's state: what the tracker, the hash pool, the API and the
//! metrics share. Owned by [`crate::daemon::run`], read by the routes and
//! the metrics through an `Arc`.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use super::migration_book::MigrationBook;
use crate::{
    hasher::HashPool,
    registry::Registry,
    templates::{Eligible, Selection, SelectionPolicy},
    tracking::{
        ebpf::Sources,
        tracker::{SyncHandle, TrackerStats},
    },
};

/// Everything the API reads.
pub struct AppState {
    pub registry: Arc<Mutex<Registry>>,
    pub pool: Option<Arc<HashPool>>,
    pub sync: Option<SyncHandle>,
    pub sources: Sources,
    pub tracker: Arc<TrackerStats>,
    pub policy: SelectionPolicy,
    pub started: Instant,
    /// Tells this agent's hash-list tokens from another run's.
    pub instance: u64,
    pub migrations: Mutex<MigrationBook>,
    /// The site store publisher's state, if one is configured.
    pub site: Option<Arc<Mutex<super::site_publisher::SiteStatus>>>,
    selection: Mutex<Option<Arc<Selection>>>,
}

impl AppState {
    pub fn new(
        registry: Arc<Mutex<Registry>>,
        pool: Option<Arc<HashPool>>,
        sync: Option<SyncHandle>,
        sources: Sources,
        tracker: Arc<TrackerStats>,
        policy: SelectionPolicy,
    ) -> Self {
        Self {
            registry,
            pool,
            sync,
            sources,
            tracker,
            policy,
            started: Instant::now(),
            instance: instance_id(),
            migrations: Mutex::new(MigrationBook::new()),
            site: None,
            selection: Mutex::new(None),
        }
    }

    /// An agent with no VM, no hash pool and no eBPF: for unit tests.
    #[cfg(test)]
    pub fn empty() -> Self {
        Self::new(
            Arc::new(Mutex::new(Registry::new(false))),
            None,
            None,
            Sources::default(),
            Arc::default(),
            SelectionPolicy {
                min_vms: 2,
                budget_bytes: 1 << 20,
            },
        )
    }

    /// The host's template catalog, selected again when contents changed.
    /// Takes the registry lock only to collect the eligible contents: call
    /// it before locking the registry (the lock is not reentrant).
    pub fn template_selection(&self) -> Arc<Selection> {
        let eligible = {
            let registry = self.registry.lock().unwrap();
            let epoch = registry.contents.epoch();
            if let Some(catalog) = &*self.selection.lock().unwrap()
                && catalog.epoch == epoch
            {
                return catalog.clone();
            }
            Eligible::host(&registry.contents, self.policy)
        };
        let catalog = Arc::new(eligible.rank());
        let mut cached = self.selection.lock().unwrap();
        // A slower selection of an older epoch must not replace a newer one.
        if cached.as_ref().is_none_or(|c| c.epoch <= catalog.epoch) {
            *cached = Some(catalog.clone());
        }
        catalog
    }
}

/// Unique per agent run (its start time and pid): a hash-list token of an
/// earlier run, whose slot epochs and marks may repeat, is never taken for
/// one of this run.
fn instance_id() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    now ^ (u64::from(std::process::id()) << 40)
}
