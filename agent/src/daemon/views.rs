//! The registry seen through the API's views ([`crate::api::views`]).

use crate::{
    api::views::{SlotView, VmView},
    registry::{Registry, SyncState, Tracking, Vm},
    templates::Selection,
};

pub fn vm_view(registry: &Registry, vm: &Vm, catalog: &Selection) -> VmView {
    let counts = vm.page_counts();
    let pages = vm.page_count() as u64;
    let clean = counts.clean + counts.zero_clean;
    let unverified = counts.unverified + counts.zero_unverified;
    let zero_pages = counts.zero_clean + counts.zero_unverified;
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
        unknown: counts.unknown,
        clean,
        dirty: counts.dirty,
        unverified,
        zero_pages,
        hashed_pct: pct(clean + unverified),
        template_pages,
        template_coverage_pct: pct(template_pages),
        stats: vm.stats,
        slots,
    }
}
