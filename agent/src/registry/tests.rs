//! State-machine tests of the registry with synthetic events, built the way
//! the eBPF programs build them: through `agent_common`'s constructors, and
//! for ioctls through the `PendingIoctl` kept from `sys_enter_ioctl` to
//! `sys_exit_ioctl`. The same machine runs on real kernel events in the
//! integration tests.

use agent_common::{
    BitmapChunk, BitmapHead, Event, EventKind, PendingIoctl, SlotRegion,
    bitmap::BITMAP_CHUNK_WORDS, ioctl,
};

use super::*;

pub(crate) const PID: u32 = 100;
/// The VM fd.
pub(crate) const FD: u32 = 5;
/// Event time of the helpers below that take none.
pub(crate) const T: u64 = 10;

/// An ioctl as `agent-ebpf/src/ioctl.rs` reports it: entered at `enter_ns`,
/// returned `ret` at `exit_ns`.
pub(crate) fn ioctl_event(pending: PendingIoctl, exit_ns: u64, ret: i64) -> Event {
    pending
        .completed(PID, exit_ns, ret)
        .expect("a successful ioctl is reported")
}

pub(crate) fn vm_created() -> Event {
    ioctl_event(PendingIoctl::create_vm(3, T), T, i64::from(FD))
}

pub(crate) fn slot_set(slot: u32, flags: u32, gpa: u64, pages: u64, uaddr: u64) -> Event {
    let region = SlotRegion {
        slot,
        flags,
        gpa,
        size: pages * 4096,
        uaddr,
    };
    ioctl_event(PendingIoctl::set_memory_region(FD, T, region), T, 0)
}

pub(crate) fn cap_enabled(cap: u32, arg0: u64) -> Event {
    ioctl_event(PendingIoctl::enable_cap(FD, T, cap, 0, arg0), T, 0)
}

/// `KVM_GET_DIRTY_LOG` of `slot`, entered at `enter_ns`, returned at `exit_ns`.
pub(crate) fn dirty_log_get(slot: u32, enter_ns: u64, exit_ns: u64) -> Event {
    ioctl_event(
        PendingIoctl::get_dirty_log(FD, enter_ns, slot, 0),
        exit_ns,
        0,
    )
}

/// A bitmap chunk of one ioctl, as `agent-ebpf/src/bitmap.rs` sends it:
/// `head`, with bit `i` set for every page `first + i` in `set`.
pub(crate) fn chunk(head: BitmapHead, first: u64, set: &[u64]) -> BitmapChunk {
    let mut words = [0u64; BITMAP_CHUNK_WORDS];
    for page in set {
        let bit = page - first;
        words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    BitmapChunk { head, words }
}

/// `KVM_GET_DIRTY_LOG` of slot 0 (`pages` pages) entered at `enter_ns`,
/// returning the pages `set`, its bitmap sent for `sent` pages: the chunk,
/// then the event.
pub(crate) fn harvest(reg: &mut Registry, enter_ns: u64, pages: u32, sent: u32, set: &[u64]) {
    if sent > 0 {
        let mut bits = chunk(BitmapHead::get(PID, enter_ns, 0, 0, sent), 0, set);
        reg.apply_bitmap(&mut bits);
    }
    let event = PendingIoctl::get_dirty_log(FD, enter_ns, 0, 0x7000)
        .completed(PID, enter_ns + 1, 0)
        .unwrap()
        .with_bitmap_pages(sent.min(pages));
    reg.apply(&event);
}

/// `KVM_CLEAR_DIRTY_LOG` of slot 0, pages `first..first + count`, entered at
/// `enter_ns`, with the pages `set` in its mask.
pub(crate) fn clear(reg: &mut Registry, enter_ns: u64, first: u64, count: u32, set: &[u64]) {
    let mut bits = chunk(
        BitmapHead::clear(PID, enter_ns, 0, first, count),
        first,
        set,
    );
    reg.apply_bitmap(&mut bits);
    let event = PendingIoctl::clear_dirty_log(FD, enter_ns, 0, first, count, 0x8000)
        .completed(PID, enter_ns + 1, 0)
        .unwrap()
        .with_bitmap_pages(count);
    reg.apply(&event);
}

/// `mark_page_dirty_in_slot` of guest frame `gfn` at `ktime_ns`.
pub(crate) fn dirty_gfn(gfn: u64, ktime_ns: u64) -> Event {
    Event::dirty_gfn(PID, ktime_ns, gfn)
}

pub(crate) fn ring_vm(pages: u64) -> Registry {
    let mut reg = Registry::new(false);
    reg.apply(&vm_created());
    reg.apply(&cap_enabled(ioctl::KVM_CAP_DIRTY_LOG_RING, 65536));
    reg.apply(&slot_set(
        0,
        ioctl::KVM_MEM_LOG_DIRTY_PAGES,
        0,
        pages,
        0x7000_0000,
    ));
    reg
}

/// Runs every queued job with `content(page)` as the page's hash.
fn run_jobs(reg: &mut Registry, content: impl Fn(u32) -> u8) {
    run_jobs_read_by(reg, 0, content);
}

/// [`run_jobs`], the reads ending at `read_end_ns`.
fn run_jobs_read_by(reg: &mut Registry, read_end_ns: u64, content: impl Fn(u32) -> u8) {
    for job in reg.take_jobs() {
        if let Some(mut plan) = reg.plan(&job) {
            let hashes: Vec<_> = plan
                .pages
                .iter()
                .map(|(p, _)| Some([content(*p); 32]))
                .collect();
            plan.read_end_ns = read_end_ns;
            reg.commit(&job, &plan, &hashes);
        }
    }
}

fn state(reg: &Registry, page: usize) -> PageState {
    reg.vm(PID).unwrap().slots[&0]
        .pages
        .get(page as u32)
        .unwrap()
        .state()
}

/// `kvm:kvm_dirty_ring_push` of entry `entry` of ring 0: `page` of slot 0.
pub(crate) fn push(entry: u32, page: u64) -> Event {
    Event::dirty_ring_push(PID, 0, entry, 0, page)
}

/// `KVM_RESET_DIRTY_RINGS` at `ktime_ns`, as the eBPF programs report it: its
/// start, ring 0's reset event, and its end.
pub(crate) fn reset(reset_index: u32, dirty_index: u32, ktime_ns: u64) -> [Event; 3] {
    [
        Event::reset_rings_begin(PID, ktime_ns, FD),
        Event::dirty_ring_reset(PID, ktime_ns, 0, reset_index, dirty_index),
        ioctl_event(PendingIoctl::reset_dirty_rings(FD, ktime_ns), ktime_ns, 1),
    ]
}

#[test]
fn full_pass_then_dirty_then_clean_after_reset() {
    let mut reg = ring_vm(8);
    run_jobs(&mut reg, |_| 1);
    assert!((0..8).all(|p| state(&reg, p) == PageState::Clean));
    assert_eq!(
        reg.contents
            .get(reg.contents.lookup(&[1; 32]).unwrap())
            .pages,
        8
    );

    reg.apply(&push(0, 3));
    assert_eq!(state(&reg, 3), PageState::Dirty);
    assert_eq!(
        reg.contents
            .get(reg.contents.lookup(&[1; 32]).unwrap())
            .pages,
        7
    );
    // No reset yet: nothing to hash, the page stays dirty.
    run_jobs(&mut reg, |_| 2);
    assert_eq!(state(&reg, 3), PageState::Dirty);
    for e in reset(1, 1, 20) {
        reg.apply(&e);
    }
    assert_eq!(state(&reg, 3), PageState::Queued);
    run_jobs(&mut reg, |_| 2);
    assert_eq!(state(&reg, 3), PageState::Clean);
    assert_eq!(
        reg.contents
            .get(reg.contents.lookup(&[2; 32]).unwrap())
            .pages,
        1
    );
    assert_eq!(reg.stats.pages_rehashed, 1);
}

#[test]
fn a_hash_read_before_a_write_is_never_committed() {
    let mut reg = ring_vm(4);
    let jobs = reg.take_jobs();
    let plan = reg.plan(&jobs[0]).unwrap();
    // The guest writes page 2 while the worker reads.
    reg.apply(&push(0, 2));
    let hashes: Vec<_> = plan.pages.iter().map(|_| Some([9; 32])).collect();
    reg.commit(&jobs[0], &plan, &hashes);
    assert_eq!(state(&reg, 2), PageState::Dirty);
    assert_eq!(state(&reg, 1), PageState::Clean);
    assert_eq!(reg.stats.hashes_dropped_stale, 1);
}

#[test]
fn a_reset_that_overtakes_its_push_queues_the_page() {
    let mut reg = ring_vm(4);
    run_jobs(&mut reg, |_| 1);
    for e in reset(1, 1, 20) {
        reg.apply(&e);
    }
    reg.apply(&push(0, 1));
    assert_eq!(state(&reg, 1), PageState::Queued);
    run_jobs(&mut reg, |_| 3);
    assert_eq!(state(&reg, 1), PageState::Clean);
}

#[test]
fn entry_indexes_wrap() {
    let mut reg = ring_vm(4);
    run_jobs(&mut reg, |_| 1);
    reg.apply(&push(u32::MAX, 0));
    reg.apply(&push(0, 1));
    for e in reset(0, 1, 20) {
        reg.apply(&e);
    }
    assert_eq!(state(&reg, 0), PageState::Queued);
    assert_eq!(state(&reg, 1), PageState::Dirty);
}

#[test]
fn lost_events_make_pages_unknown_until_the_rings_are_reset() {
    let mut reg = ring_vm(4);
    run_jobs(&mut reg, |_| 1);
    reg.note_loss(Some(PID), 50);
    assert!((0..4).all(|p| state(&reg, p) == PageState::Unknown));
    assert!(reg.contents.is_empty());
    // A reset batch that began before the loss does not count.
    for e in reset(5, 5, 40) {
        reg.apply(&e);
    }
    run_jobs(&mut reg, |_| 1);
    assert_eq!(state(&reg, 0), PageState::Unknown);
    // After the loss: ring holds entries up to 7, reset only to 6.
    for e in reset(6, 7, 60) {
        reg.apply(&e);
    }
    run_jobs(&mut reg, |_| 1);
    assert_eq!(state(&reg, 0), PageState::Unknown);
    // A later reset passes the barrier: pages are hashed again.
    for e in reset(7, 7, 70) {
        reg.apply(&e);
    }
    run_jobs(&mut reg, |_| 4);
    assert!((0..4).all(|p| state(&reg, p) == PageState::Clean));
}

#[test]
fn an_adopted_vm_syncs_after_its_first_complete_reset() {
    let mut reg = Registry::new(false);
    reg.adopt(PID, 5);
    reg.apply(&push(3, 1)); // before the slot is known
    reg.apply(&slot_set(0, 1, 0, 4, 1));
    assert_eq!(state(&reg, 1), PageState::Dirty);
    assert!(reg.take_jobs().is_empty());
    for e in reset(4, 4, 20) {
        reg.apply(&e);
    }
    run_jobs(&mut reg, |_| 1);
    assert!((0..4).all(|p| state(&reg, p) == PageState::Clean));
}

#[test]
fn untracked_slots_are_rescanned_as_unverified() {
    let mut reg = Registry::new(false);
    reg.apply(&vm_created());
    reg.apply(&slot_set(0, 0, 0, 10, 1));
    assert!(reg.take_jobs().is_empty());
    let jobs = reg.rescan_jobs(6);
    assert_eq!(jobs[0].pages, JobPages::Range { first: 0, count: 6 });
    for job in jobs {
        let plan = reg.plan(&job).unwrap();
        let hashes: Vec<_> = plan.pages.iter().map(|_| Some([7; 32])).collect();
        reg.commit(&job, &plan, &hashes);
    }
    assert_eq!(state(&reg, 5), PageState::Unverified);
    assert_eq!(state(&reg, 6), PageState::Unknown);
    assert_eq!(
        reg.rescan_jobs(6)[0].pages,
        JobPages::Range { first: 6, count: 4 }
    );
}

#[test]
fn process_exit_removes_the_vm_and_its_counts() {
    let mut reg = ring_vm(4);
    run_jobs(&mut reg, |p| p as u8);
    assert_eq!(reg.contents.len(), 4);
    reg.apply(&Event::process_exit(PID, T));
    assert!(reg.vm(PID).is_none());
    assert!(reg.contents.is_empty());
}

#[test]
fn read_only_slots_are_tracked_without_dirty_logging() {
    let mut reg = Registry::new(false);
    reg.apply(&vm_created());
    reg.apply(&slot_set(0, ioctl::KVM_MEM_READONLY, 0, 2, 1));
    run_jobs(&mut reg, |_| 5);
    assert_eq!(state(&reg, 0), PageState::Clean);
}

#[test]
fn a_bitmap_vm_resyncs_only_after_every_logged_slot_was_harvested() {
    let mut reg = Registry::new(true);
    reg.apply(&vm_created());
    for slot in 0..2u32 {
        reg.apply(&slot_set(
            slot,
            ioctl::KVM_MEM_LOG_DIRTY_PAGES,
            u64::from(slot) * 4 * 4096,
            4,
            1,
        ));
    }
    run_jobs(&mut reg, |_| 1);
    reg.note_loss(Some(PID), 50);
    // A GET that began before the loss harvested nothing missed.
    reg.apply(&dirty_log_get(0, 40, 55));
    reg.apply(&dirty_log_get(1, 45, 58));
    assert!(reg.vm(PID).unwrap().sync != SyncState::Synced);
    let get = |slot: u32| dirty_log_get(slot, 60, 61);
    reg.apply(&get(0));
    assert!(
        reg.vm(PID).unwrap().sync != SyncState::Synced,
        "slot 1 may still hold unreported writes"
    );
    reg.apply(&get(1));
    assert_eq!(reg.vm(PID).unwrap().sync, SyncState::Synced);
    run_jobs(&mut reg, |_| 2);
    assert_eq!(state(&reg, 0), PageState::Clean);
}

/// A VM with QEMU's default dirty log: manual protection, every bit set
/// when logging starts; slot 0 of `pages` pages, logged.
pub(crate) fn manual_protect_vm(pages: u64) -> Registry {
    let mut reg = Registry::new(false);
    reg.apply(&vm_created());
    reg.apply(&cap_enabled(
        ioctl::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ioctl::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | ioctl::KVM_DIRTY_LOG_INITIALLY_SET,
    ));
    reg.apply(&slot_set(
        0,
        ioctl::KVM_MEM_LOG_DIRTY_PAGES,
        0,
        pages,
        0x7000_0000,
    ));
    reg
}

#[test]
fn manual_protect_pages_are_clean_after_a_clear_a_read_and_a_harvest_after_the_read() {
    let mut reg = manual_protect_vm(8);
    assert!(
        reg.take_jobs().is_empty(),
        "every bit is set: nothing to read before a CLEAR"
    );
    let all: Vec<u64> = (0..8).collect();
    harvest(&mut reg, 20, 8, 8, &all);
    assert_eq!(state(&reg, 0), PageState::Dirty);
    clear(&mut reg, 30, 0, 8, &all);
    assert_eq!(state(&reg, 0), PageState::Queued);
    run_jobs_read_by(&mut reg, 35, |_| 1);
    assert_eq!(state(&reg, 0), PageState::Confirming);
    // A harvest that entered during the read confirms nothing.
    harvest(&mut reg, 34, 8, 8, &[]);
    assert_eq!(state(&reg, 0), PageState::Confirming);
    assert!(!reg.clean_at(PID, 0, 35), "no harvest entered after 35 yet");
    // One that entered after it, with the page unwritten, does.
    harvest(&mut reg, 40, 8, 8, &[5]);
    assert_eq!(state(&reg, 0), PageState::Clean);
    assert_eq!(
        state(&reg, 5),
        PageState::Dirty,
        "written after the CLEAR: never clean"
    );
    // Clean at a moment only if a harvest entered after it.
    assert!(reg.clean_at(PID, 0, 40));
    assert!(!reg.clean_at(PID, 0, 41));
    assert!(!reg.all_clean_at(PID, 41));
    harvest(&mut reg, 50, 8, 8, &[0]);
    assert_eq!(state(&reg, 0), PageState::Dirty);
    assert!(reg.all_clean_at(PID, 41));
    // Dirty logging off: nothing can be confirmed any more.
    reg.apply(&slot_set(0, 0, 0, 8, 0x7000_0000));
    assert_eq!(state(&reg, 1), PageState::Unverified);
}

#[test]
fn a_clear_after_a_read_drops_it_and_uncovered_pages_become_unknown() {
    let mut reg = manual_protect_vm(8);
    let all: Vec<u64> = (0..8).collect();
    harvest(&mut reg, 20, 8, 8, &all);
    clear(&mut reg, 30, 0, 8, &all);
    let jobs = reg.take_jobs();
    let mut plan = reg.plan(&jobs[0]).unwrap();
    // The page is cleared again while the read is under way: the CLEAR may
    // have consumed a write made after the read began.
    clear(&mut reg, 32, 0, 8, &[3]);
    plan.read_end_ns = 33;
    reg.commit(&jobs[0], &plan, &vec![Some([1; 32]); plan.pages.len()]);
    assert_eq!(state(&reg, 3), PageState::Queued);
    assert_eq!(state(&reg, 2), PageState::Confirming);
    harvest(&mut reg, 40, 8, 8, &[]);
    assert_eq!(state(&reg, 3), PageState::Queued);
    assert_eq!(state(&reg, 2), PageState::Clean);
    // A harvest whose bitmap came for 4 of the 8 pages (the ring buffer
    // was full): the other 4 are unknown.
    harvest(&mut reg, 50, 8, 4, &[]);
    assert_eq!(state(&reg, 2), PageState::Clean);
    for page in 4..8 {
        assert_eq!(state(&reg, page), PageState::Unknown, "page {page}");
    }
    // Its bitmap lost altogether: all of them.
    harvest(&mut reg, 60, 8, 0, &[]);
    assert_eq!(state(&reg, 2), PageState::Unknown);
}

#[test]
fn a_bitmap_vm_without_manual_protection_rereads_what_each_harvest_reports() {
    // No fexit (this kernel): the GET's bitmap is the only report.
    let mut reg = Registry::new(false);
    reg.apply(&vm_created());
    reg.apply(&slot_set(
        0,
        ioctl::KVM_MEM_LOG_DIRTY_PAGES,
        0,
        4,
        0x7000_0000,
    ));
    // Logging on without INITIALLY_SET protects every page: a full pass.
    run_jobs_read_by(&mut reg, 15, |_| 1);
    assert_eq!(state(&reg, 0), PageState::Confirming);
    harvest(&mut reg, 20, 4, 4, &[1]);
    assert_eq!(state(&reg, 0), PageState::Clean);
    // The GET re-protected page 1: read again, confirmed by the next.
    assert_eq!(state(&reg, 1), PageState::Queued);
    run_jobs_read_by(&mut reg, 25, |_| 2);
    harvest(&mut reg, 30, 4, 4, &[]);
    assert_eq!(state(&reg, 1), PageState::Clean);
    assert_eq!(reg.vm(PID).unwrap().dirty_mode.name(), "bitmap");
    // A CLEAR shows the mode is manual after all (an adopted VM).
    clear(&mut reg, 40, 0, 4, &[]);
    assert_eq!(reg.vm(PID).unwrap().dirty_mode.name(), "bitmap-mp");
}

#[test]
fn removed_vms_are_reported_once_for_their_mappings_to_go() {
    let mut registry = Registry::new(false);
    registry.adopt(4242, 0);
    registry.remove_vm(4242);
    registry.remove_vm(4242);
    assert_eq!(registry.take_removed(), vec![4242]);
    assert!(registry.take_removed().is_empty());
}

fn shared_guest(regions: &[(u64, u64, &str)]) -> super::SharedRamGuest {
    super::SharedRamGuest {
        pid: PID,
        regions: regions
            .iter()
            .map(|(uaddr, pages, path)| super::RamRegion {
                uaddr: *uaddr,
                size: pages * 4096,
                offset: 0,
                path: (*path).into(),
            })
            .collect(),
    }
}

#[test]
fn a_qemu_guest_on_shared_memory_is_rescanned_as_unverified() {
    let mut reg = Registry::new(false);
    reg.adopt_shared_ram(&shared_guest(&[
        (0x9000_0000, 2, "/dev/shm/b"),
        (0x7000_0000, 4, "/dev/shm/a"),
    ]));
    let vm = reg.vm(PID).unwrap();
    assert_eq!(vm.discovery, Discovery::SharedMemory);
    assert_eq!(vm.dirty_mode, DirtyMode::None);
    // Laid end to end in the order of their files.
    let layout: Vec<(u64, u64, u64)> = vm
        .slots
        .values()
        .map(|s| (s.gpa, s.size, s.uaddr))
        .collect();
    assert_eq!(
        layout,
        vec![
            (0, 4 * 4096, 0x7000_0000),
            (4 * 4096, 2 * 4096, 0x9000_0000)
        ]
    );
    for slot in vm.slots.values() {
        assert_eq!(reg.tracking(vm, slot), Tracking::Untracked);
    }
    assert!(
        reg.take_jobs().is_empty(),
        "no write reports, no tracked jobs"
    );
    for job in reg.rescan_jobs(100) {
        assert_eq!(job.purpose, Purpose::Rescan);
        let plan = reg.plan(&job).unwrap();
        let hashes: Vec<_> = plan.pages.iter().map(|_| Some([9; 32])).collect();
        reg.commit(&job, &plan, &hashes);
    }
    assert_eq!(state(&reg, 3), PageState::Unverified);
    assert_eq!(reg.contents.len(), 1);

    // Found again unchanged: the hashes stay.
    reg.adopt_shared_ram(&shared_guest(&[
        (0x7000_0000, 4, "/dev/shm/a"),
        (0x9000_0000, 2, "/dev/shm/b"),
    ]));
    assert_eq!(state(&reg, 3), PageState::Unverified);
    // A mapping moved: new slots, nothing kept.
    reg.adopt_shared_ram(&shared_guest(&[(0x7100_0000, 4, "/dev/shm/a")]));
    assert_eq!(state(&reg, 3), PageState::Unknown);
    assert!(reg.contents.is_empty());
    assert_eq!(
        reg.take_removed(),
        vec![PID],
        "the old mappings are dropped"
    );

    // Gone from the scan: forgotten.
    reg.drop_shared_ram_except(&[]);
    assert!(reg.vm(PID).is_none());
}

#[test]
fn a_vm_known_through_kvm_is_never_taken_for_a_shared_memory_guest() {
    let mut reg = ring_vm(4);
    reg.adopt_shared_ram(&shared_guest(&[(0x7100_0000, 4, "/dev/shm/a")]));
    let vm = reg.vm(PID).unwrap();
    assert_eq!(vm.discovery, Discovery::AtCreation);
    assert_eq!(vm.slots[&0].uaddr, 0x7000_0000);
    reg.drop_shared_ram_except(&[]);
    assert!(reg.vm(PID).is_some());
    // A shared-memory guest that turns out to use KVM becomes a KVM VM.
    let mut reg = Registry::new(false);
    reg.adopt_shared_ram(&shared_guest(&[(0x7100_0000, 4, "/dev/shm/a")]));
    reg.apply(&vm_created());
    assert_eq!(reg.vm(PID).unwrap().discovery, Discovery::AtCreation);
    assert!(reg.vm(PID).unwrap().slots.is_empty());
}

#[test]
fn bitmap_writes_before_a_get_dirty_log_are_requeued_and_writes_during_it_stay_dirty() {
    // A bitmap-mode VM (no dirty ring) on a host where fentry loads.
    let mut reg = Registry::new(true);
    reg.apply(&vm_created());
    reg.apply(&slot_set(
        0,
        ioctl::KVM_MEM_LOG_DIRTY_PAGES,
        0,
        8,
        0x7000_0000,
    ));
    run_jobs(&mut reg, |_| 1);
    assert!((0..8).all(|p| state(&reg, p) == PageState::Clean));
    reg.apply(&dirty_gfn(2, 100));
    reg.apply(&dirty_gfn(3, 150));
    // The VMM's GET begins at 200; the guest writes page 5 while it runs.
    reg.apply(&dirty_gfn(5, 250));
    reg.apply(&dirty_log_get(0, 200, 300));
    assert_eq!(state(&reg, 2), PageState::Queued, "written before the GET");
    assert_eq!(state(&reg, 3), PageState::Queued, "written before the GET");
    assert_eq!(state(&reg, 5), PageState::Dirty, "written during the GET");
    run_jobs(&mut reg, |p| 10 + p as u8);
    assert_eq!(state(&reg, 2), PageState::Clean);
    assert_eq!(state(&reg, 3), PageState::Clean);
    assert_eq!(state(&reg, 5), PageState::Dirty);
    assert!(reg.contents.lookup(&[12; 32]).is_some());
    assert!(reg.contents.lookup(&[15; 32]).is_none());
    // The next GET, begun after the write, covers page 5.
    reg.apply(&dirty_log_get(0, 400, 410));
    assert_eq!(state(&reg, 5), PageState::Queued);
    run_jobs(&mut reg, |p| 10 + p as u8);
    assert_eq!(state(&reg, 5), PageState::Clean);
    assert!(reg.contents.lookup(&[15; 32]).is_some());
}

#[test]
fn every_kind_built_as_the_ebpf_programs_build_it_is_decoded_by_the_registry() {
    let mut reg = Registry::new(false);
    reg.apply(&vm_created());
    assert_eq!(
        reg.vm(PID).unwrap().vm_fd,
        Some(FD),
        "the fd KVM_CREATE_VM returned"
    );
    reg.apply(&cap_enabled(ioctl::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1));
    assert_eq!(
        reg.vm(PID).unwrap().dirty_mode,
        DirtyMode::Bitmap {
            manual_protect: true
        }
    );
    reg.apply(&cap_enabled(ioctl::KVM_CAP_DIRTY_LOG_RING, 65536));
    assert_eq!(reg.vm(PID).unwrap().dirty_mode, DirtyMode::Ring);
    reg.apply(&slot_set(
        0,
        ioctl::KVM_MEM_LOG_DIRTY_PAGES,
        0x10_0000,
        4,
        0x7000_0000,
    ));
    reg.apply(&slot_set(1, 0, 0x20_0000, 4, 0x8000_0000));
    {
        let slot = &reg.vm(PID).unwrap().slots[&1];
        assert_eq!(
            (slot.gpa, slot.size, slot.uaddr, slot.flags),
            (0x20_0000, 4 * 4096, 0x8000_0000, 0)
        );
    }
    run_jobs(&mut reg, |_| 1);
    for job in reg.rescan_jobs(100) {
        let plan = reg.plan(&job).unwrap();
        let hashes: Vec<_> = plan.pages.iter().map(|_| Some([1; 32])).collect();
        reg.commit(&job, &plan, &hashes);
    }
    assert_eq!(state(&reg, 3), PageState::Clean);

    // Ring 2, entry 7: page 3 of slot 0.
    reg.apply(&Event::dirty_ring_push(PID, 2, 7, 0, 3));
    assert_eq!(state(&reg, 3), PageState::Dirty);
    assert_eq!(reg.vm(PID).unwrap().rings[&2].pending[0].entry, 7);
    reg.apply(&Event::reset_rings_begin(PID, 20, FD));
    assert_eq!(reg.vm(PID).unwrap().reset_batch.as_ref().unwrap().0, 20);
    reg.apply(&Event::dirty_ring_reset(PID, 20, 2, 8, 8));
    assert_eq!(state(&reg, 3), PageState::Queued, "entry 7 is below 8");
    reg.apply(&ioctl_event(PendingIoctl::reset_dirty_rings(FD, 20), 21, 1));
    assert!(reg.vm(PID).unwrap().reset_batch.is_none());

    // A write fault on page 2 of the unlogged slot 1.
    let page2 = |reg: &Registry| reg.vm(PID).unwrap().slots[&1].pages.get(2).unwrap().state();
    assert_eq!(page2(&reg), PageState::Unverified);
    reg.apply(&Event::write_fault(PID, 30, 0x20_0000 + 2 * 4096));
    assert_eq!(page2(&reg), PageState::Unknown);

    // In ring mode the bitmap reports are redundant: decoded, counted, ignored.
    reg.apply(&dirty_gfn(0x100, 31));
    reg.apply(&dirty_log_get(0, 32, 33));
    reg.apply(&ioctl_event(
        PendingIoctl::clear_dirty_log(FD, 34, 0, 0, 4, 0x8000),
        35,
        0,
    ));
    assert_eq!(state(&reg, 0), PageState::Clean);

    reg.apply(&Event::process_exit(PID, 40));
    assert!(reg.vm(PID).is_none());

    for kind in EventKind::ALL {
        let name = kind.name().unwrap();
        let expected = match kind {
            EventKind::CAP_ENABLED | EventKind::SLOT_SET => 2,
            _ => 1,
        };
        assert_eq!(reg.stats.events.get(name), Some(&expected), "{name}");
    }
    assert_eq!(reg.stats.events_rejected, 0);
    assert_eq!(reg.stats.events_unknown_vm, 0);
}

#[test]
fn an_event_of_unknown_kind_is_counted_and_changes_nothing() {
    let mut reg = Registry::new(false);
    let mut bytes = bytemuck::bytes_of(&Event::process_exit(PID, T)).to_vec();
    bytes[..4].copy_from_slice(&99u32.to_ne_bytes());
    let unknown: Event = bytemuck::pod_read_unaligned(&bytes);
    reg.apply(&unknown);
    reg.apply(&unknown);
    assert_eq!(reg.stats.events_rejected, 2);
    assert!(reg.stats.events.is_empty());
    assert!(
        reg.vm(PID).is_none(),
        "no VM adopted for an event nobody can read"
    );
}

/// What can happen to the VM of [`ring_vm`], for property tests.
#[derive(Clone, Debug)]
pub(crate) enum RingOp {
    Push(u64),
    Reset,
    Hash(u8),
    Loss,
    Logging(bool),
}

/// [`RingOp`]s on pages `0..pages`.
pub(crate) fn ring_op(pages: u64) -> impl proptest::strategy::Strategy<Value = RingOp> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..pages).prop_map(RingOp::Push),
        2 => Just(RingOp::Reset),
        3 => (0u8..4).prop_map(RingOp::Hash),
        1 => Just(RingOp::Loss),
        1 => any::<bool>().prop_map(RingOp::Logging),
    ]
}

/// Applies [`RingOp`]s to the VM of [`ring_vm`]`(pages)`: its next ring
/// entry and the event clock.
pub(crate) struct RingDriver {
    pages: u64,
    entry: u32,
    now: u64,
}

impl RingDriver {
    pub(crate) fn new(pages: u64) -> Self {
        Self {
            pages,
            entry: 0,
            now: T,
        }
    }

    pub(crate) fn apply(&mut self, reg: &mut Registry, op: &RingOp) {
        self.now += 1;
        match *op {
            RingOp::Push(page) => {
                reg.apply(&push(self.entry, page));
                self.entry += 1;
            }
            RingOp::Reset => {
                for event in reset(self.entry, self.entry, self.now) {
                    reg.apply(&event);
                }
            }
            RingOp::Hash(seed) => {
                for job in reg.take_jobs().into_iter().chain(reg.rescan_jobs(64)) {
                    if let Some(plan) = reg.plan(&job) {
                        let hashes: Vec<_> = plan
                            .pages
                            .iter()
                            .map(|(page, _)| {
                                let value = (*page as u8).wrapping_add(seed) % 4;
                                Some(if value == 0 {
                                    crate::content::zero_page_hash()
                                } else {
                                    [value; 32]
                                })
                            })
                            .collect();
                        reg.commit(&job, &plan, &hashes);
                    }
                }
            }
            RingOp::Loss => reg.note_loss(Some(PID), self.now),
            RingOp::Logging(on) => {
                let flags = if on {
                    ioctl::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                };
                reg.apply(&slot_set(0, flags, 0, self.pages, 0x7000_0000));
            }
        }
    }
}

mod page_counts {
    use proptest::prelude::*;

    use super::*;
    use crate::content::zero_page_hash;

    /// The counts a walk over every page gives.
    fn recount(reg: &Registry) -> PageCounts {
        let mut counts = PageCounts::default();
        let zero = reg.contents.lookup(&zero_page_hash());
        for slot in reg.vm(PID).unwrap().slots.values() {
            for page in slot.pages.iter() {
                let is_zero = Some(page.content) == zero;
                match page.state() {
                    PageState::Unknown => counts.unknown += 1,
                    PageState::Dirty | PageState::Queued => counts.dirty += 1,
                    PageState::Clean if is_zero => counts.zero_clean += 1,
                    PageState::Clean => counts.clean += 1,
                    PageState::Unverified | PageState::Confirming if is_zero => {
                        counts.zero_unverified += 1
                    }
                    PageState::Unverified | PageState::Confirming => counts.unverified += 1,
                }
            }
        }
        counts
    }

    proptest! {
        #[test]
        fn counts_kept_as_pages_change_equal_a_recount(ops in prop::collection::vec(ring_op(16), 1..120)) {
            let mut reg = ring_vm(16);
            let mut driver = RingDriver::new(16);
            for op in ops {
                driver.apply(&mut reg, &op);
                let vm = reg.vm(PID).unwrap();
                prop_assert_eq!(vm.page_counts(), recount(&reg));
                prop_assert_eq!(vm.page_counts().total(), 16);
                let hashed: u64 = vm.counts.iter().map(|(_, n)| u64::from(n)).sum();
                let c = vm.page_counts();
                prop_assert_eq!(hashed, c.clean + c.unverified + c.zero_clean + c.zero_unverified);
            }
        }
    }
}

#[test]
fn with_pml_a_read_is_confirmed_by_the_second_harvest_after_it() {
    let mut reg = manual_protect_vm(4);
    reg.harvest_lag = 2;
    let all: Vec<u64> = (0..4).collect();
    harvest(&mut reg, 20, 4, 4, &all);
    clear(&mut reg, 30, 0, 4, &all);
    run_jobs_read_by(&mut reg, 35, |_| 1);
    // The first harvest after the read may not hold a write still in a
    // vCPU's PML buffer.
    harvest(&mut reg, 40, 4, 4, &[]);
    assert_eq!(state(&reg, 0), PageState::Confirming);
    harvest(&mut reg, 50, 4, 4, &[]);
    assert_eq!(state(&reg, 0), PageState::Clean);
    assert!(reg.clean_at(PID, 0, 40));
    assert!(
        !reg.clean_at(PID, 0, 41),
        "one harvest after 41 is not enough"
    );
}

#[test]
fn after_a_loss_every_page_is_read_again_and_confirmed_by_the_harvests() {
    let mut reg = manual_protect_vm(4);
    let all: Vec<u64> = (0..4).collect();
    harvest(&mut reg, 20, 4, 4, &all);
    clear(&mut reg, 30, 0, 4, &all);
    run_jobs_read_by(&mut reg, 35, |_| 1);
    harvest(&mut reg, 40, 4, 4, &[]);
    assert_eq!(state(&reg, 1), PageState::Clean);
    reg.note_loss(Some(PID), 45);
    assert_eq!(state(&reg, 1), PageState::Unknown);
    // A harvest after the loss resyncs; pages QEMU will not clear again (it
    // found them clean) are read in a full pass, and confirmed by the next.
    harvest(&mut reg, 50, 4, 4, &[]);
    assert_eq!(reg.vm(PID).unwrap().sync, SyncState::Synced);
    run_jobs_read_by(&mut reg, 55, |_| 1);
    assert_eq!(state(&reg, 1), PageState::Confirming);
    harvest(&mut reg, 60, 4, 4, &[]);
    assert_eq!(state(&reg, 1), PageState::Clean);
}
