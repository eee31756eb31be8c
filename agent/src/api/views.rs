//! What the API shows of the registry (JSON views).

use serde::Serialize;

use crate::{
    content::zero_page_hash,
    registry::{DirtyMode, Discovery, PageState, Registry, SyncState, Tracking, Vm, vm::VmStats},
    templates::Catalog,
};

#[derive(Clone, Debug, Serialize)]
pub struct SlotView {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    pub flags: u32,
    pub tracking: Tracking,
}

#[derive(Clone, Debug, Serialize)]
pub struct VmView {
    pub pid: u32,
    pub comm: String,
    pub discovery: Discovery,
    pub dirty_mode: DirtyMode,
    /// The weakest tracking of its slots ("untracked" if it has no slot yet).
    pub tracking: Tracking,
    pub synced: bool,
    pub note: Option<String>,
    pub pages: u64,
    pub unknown: u64,
    pub clean: u64,
    pub dirty: u64,
    pub unverified: u64,
    pub zero_pages: u64,
    pub hashed_pct: f64,
    pub template_pages: u64,
    pub template_coverage_pct: f64,
    pub stats: VmStats,
    pub slots: Vec<SlotView>,
}

pub fn vm_view(registry: &Registry, vm: &Vm, catalog: &Catalog) -> VmView {
    let states = vm.state_counts();
    let get = |state| states.get(&state).copied().unwrap_or(0);
    let pages = vm.page_count() as u64;
    let clean = get(PageState::Clean);
    let unverified = get(PageState::Unverified);
    let zero_pages = registry
        .contents
        .lookup(&zero_page_hash())
        .and_then(|id| vm.counts.iter().find(|(c, _)| *c == id))
        .map_or(0, |(_, n)| u64::from(n));
    let template_pages = catalog.covered_pages(&vm.counts);
    let slots: Vec<SlotView> = vm
        .slots
        .values()
        .map(|slot| SlotView {
            slot: slot.id,
            gpa: slot.gpa,
            size: slot.size,
            uaddr: slot.uaddr,
            flags: slot.flags,
            tracking: registry.tracking(vm, slot),
        })
        .collect();
    let tracking = slots.iter().map(|s| s.tracking).max_by_key(|t| match t {
        Tracking::Tracked => 0,
        Tracking::Syncing => 1,
        Tracking::Untracked => 2,
    });
    let pct = |n: u64| {
        if pages == 0 {
            0.0
        } else {
            100.0 * n as f64 / pages as f64
        }
    };
    VmView {
        pid: vm.pid,
        comm: vm.comm.clone(),
        discovery: vm.discovery,
        dirty_mode: vm.dirty_mode,
        tracking: tracking.unwrap_or(Tracking::Untracked),
        synced: vm.sync == SyncState::Synced,
        note: vm.note.clone(),
        pages,
        unknown: get(PageState::Unknown),
        clean,
        dirty: get(PageState::Dirty) + get(PageState::Queued),
        unverified,
        zero_pages,
        hashed_pct: pct(clean + unverified),
        template_pages,
        template_coverage_pct: pct(template_pages),
        stats: vm.stats,
        slots,
    }
}
