//! State-machine tests of the registry with synthetic events. The same
//! machine runs on real kernel events in the integration tests.

use agent_common::{Event, ioctl, kind};

use super::*;

const PID: u32 = 100;

fn ev(kind: u32) -> Event {
    Event {
        kind,
        pid: PID,
        ktime_ns: 10,
        ..Event::default()
    }
}

fn ring_vm(pages: u64) -> Registry {
    let mut reg = Registry::new(false);
    reg.apply(&Event {
        fd: 5,
        ..ev(kind::VM_CREATED)
    });
    reg.apply(&Event {
        slot: ioctl::KVM_CAP_DIRTY_LOG_RING,
        addr: 65536,
        ..ev(kind::CAP_ENABLED)
    });
    reg.apply(&Event {
        slot: 0,
        flags: ioctl::KVM_MEM_LOG_DIRTY_PAGES,
        addr: 0,
        size: pages * 4096,
        uaddr: 0x7000_0000,
        ..ev(kind::SLOT_SET)
    });
    reg
}

/// Runs every queued job with `content(page)` as the page's hash.
fn run_jobs(reg: &mut Registry, content: impl Fn(u32) -> u8) {
    for job in reg.take_jobs() {
        if let Some(plan) = reg.plan(&job) {
            let hashes: Vec<_> = plan
                .pages
                .iter()
                .map(|(p, _)| Some([content(*p); 32]))
                .collect();
            reg.commit(&job, &plan, &hashes);
        }
    }
}

fn state(reg: &Registry, page: usize) -> PageState {
    reg.vm(PID).unwrap().slots[&0].pages[page].state()
}

fn push(entry: u32, page: u64) -> Event {
    Event {
        ring: 0,
        seq: entry,
        slot: 0,
        addr: page,
        ..ev(kind::DIRTY_RING_PUSH)
    }
}

fn reset(reset_index: u32, dirty_index: u32, ktime_ns: u64) -> [Event; 3] {
    [
        Event {
            ktime_ns,
            ..ev(kind::RESET_RINGS_BEGIN)
        },
        Event {
            ring: 0,
            seq: reset_index,
            addr: u64::from(dirty_index),
            ktime_ns,
            ..ev(kind::DIRTY_RING_RESET)
        },
        Event {
            ktime_ns,
            ..ev(kind::RESET_RINGS_END)
        },
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
    reg.apply(&Event {
        slot: 0,
        flags: 1,
        size: 4 * 4096,
        uaddr: 1,
        ktime_ns: 10,
        ..ev(kind::SLOT_SET)
    });
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
    reg.apply(&ev(kind::VM_CREATED));
    reg.apply(&Event {
        slot: 0,
        flags: 0,
        size: 10 * 4096,
        uaddr: 1,
        ..ev(kind::SLOT_SET)
    });
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
    reg.apply(&ev(kind::PROCESS_EXIT));
    assert!(reg.vm(PID).is_none());
    assert!(reg.contents.is_empty());
}

#[test]
fn read_only_slots_are_tracked_without_dirty_logging() {
    let mut reg = Registry::new(false);
    reg.apply(&ev(kind::VM_CREATED));
    reg.apply(&Event {
        slot: 0,
        flags: ioctl::KVM_MEM_READONLY,
        size: 2 * 4096,
        uaddr: 1,
        ..ev(kind::SLOT_SET)
    });
    run_jobs(&mut reg, |_| 5);
    assert_eq!(state(&reg, 0), PageState::Clean);
}

#[test]
fn a_bitmap_vm_resyncs_only_after_every_logged_slot_was_harvested() {
    let mut reg = Registry::new(true);
    reg.apply(&ev(kind::VM_CREATED));
    for slot in 0..2u32 {
        reg.apply(&Event {
            slot,
            flags: ioctl::KVM_MEM_LOG_DIRTY_PAGES,
            addr: u64::from(slot) * 4 * 4096,
            size: 4 * 4096,
            uaddr: 1,
            ..ev(kind::SLOT_SET)
        });
    }
    run_jobs(&mut reg, |_| 1);
    reg.note_loss(Some(PID), 50);
    let get = |slot: u32| Event {
        slot,
        size: 60,
        ktime_ns: 61,
        ..ev(kind::DIRTY_LOG_GET)
    };
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

#[test]
fn removed_vms_are_reported_once_for_their_mappings_to_go() {
    let mut registry = Registry::new(false);
    registry.adopt(4242, 0);
    registry.remove_vm(4242);
    registry.remove_vm(4242);
    assert_eq!(registry.take_removed(), vec![4242]);
    assert!(registry.take_removed().is_empty());
}

fn shared_guest(regions: &[(u64, u64, &str)]) -> crate::qemu_guests::SharedRamGuest {
    crate::qemu_guests::SharedRamGuest {
        pid: PID,
        regions: regions
            .iter()
            .map(|(uaddr, pages, path)| crate::qemu_guests::RamRegion {
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
    reg.apply(&Event {
        fd: 5,
        ..ev(kind::VM_CREATED)
    });
    assert_eq!(reg.vm(PID).unwrap().discovery, Discovery::AtCreation);
    assert!(reg.vm(PID).unwrap().slots.is_empty());
}

/// `KVM_GET_DIRTY_LOG` of `slot` as `agent-ebpf/src/ioctl.rs` reports it: the
/// `PendingIoctl` filled at `sys_enter_ioctl` (at `enter_ns`), copied into the
/// event at `sys_exit_ioctl` (at `exit_ns`).
fn dirty_log_get_as_ebpf(slot: u32, enter_ns: u64, exit_ns: u64) -> Event {
    let _ = enter_ns; // sys_enter_ioctl records no time
    let pending = agent_common::PendingIoctl {
        cmd: ioctl::KVM_GET_DIRTY_LOG,
        fd: 5,
        slot,
        ..Default::default()
    };
    Event {
        kind: kind::DIRTY_LOG_GET,
        pid: PID,
        ktime_ns: exit_ns,
        fd: pending.fd,
        slot: pending.slot,
        flags: pending.flags,
        addr: pending.addr,
        size: pending.size,
        uaddr: pending.uaddr,
        ..Event::default()
    }
}

#[test]
fn bitmap_writes_before_a_get_dirty_log_are_requeued_and_writes_during_it_stay_dirty() {
    let mut reg = Registry::new(true);
    reg.apply(&Event {
        fd: 5,
        ..ev(kind::VM_CREATED)
    });
    reg.apply(&Event {
        slot: 0,
        flags: ioctl::KVM_MEM_LOG_DIRTY_PAGES,
        addr: 0,
        size: 8 * 4096,
        uaddr: 0x7000_0000,
        ..ev(kind::SLOT_SET)
    });
    run_jobs(&mut reg, |_| 1);
    assert!((0..8).all(|p| state(&reg, p) == PageState::Clean));
    let gfn = |page: u64, ktime_ns: u64| Event {
        addr: page,
        ktime_ns,
        ..ev(kind::DIRTY_GFN)
    };
    reg.apply(&gfn(2, 100));
    reg.apply(&gfn(3, 150));
    // The VMM's GET begins at 200; the guest writes page 5 while it runs.
    reg.apply(&gfn(5, 250));
    reg.apply(&dirty_log_get_as_ebpf(0, 200, 300));
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
    reg.apply(&dirty_log_get_as_ebpf(0, 400, 410));
    assert_eq!(state(&reg, 5), PageState::Queued);
    run_jobs(&mut reg, |p| 10 + p as u8);
    assert_eq!(state(&reg, 5), PageState::Clean);
    assert!(reg.contents.lookup(&[15; 32]).is_some());
}
