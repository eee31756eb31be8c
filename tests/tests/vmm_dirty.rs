//! The test VMM's dirty logging on the real /dev/kvm: ring, bitmap and none;
//! auto and manual harvests; rings much smaller than the writes.

use pagefp_tests::{
    agent_process::TempDir,
    require_kvm,
    vmm_client::{DirtyMode, Harvest, Op, Refused, VmmArgs, VmmProcess, testvmm_binary},
};

fn spawn(dir: &TempDir, name: &str, edit: impl FnOnce(&mut VmmArgs)) -> VmmProcess {
    let mut args = VmmArgs::new(dir.0.join(format!("{name}.sock")), 8);
    edit(&mut args);
    VmmProcess::spawn(&testvmm_binary(), &args).expect("starting pagefp-testvmm")
}

fn touch(first: u32, count: u32, value: u32) -> Op {
    Op::Touch {
        first,
        count,
        value,
    }
}

#[test]
fn ring_harvest_reports_each_written_page_once() {
    require_kvm!("ring_harvest_reports_each_written_page_once");
    let dir = TempDir::new("pagefp-vmm-ring");
    let vmm = spawn(&dir, "ring", |_| {});
    let report = vmm
        .run(&[
            Op::Random {
                first: 10,
                count: 10,
                seed: 1,
            },
            touch(15, 10, 2),
            touch(15, 10, 3),
        ])
        .unwrap();
    assert_eq!(report.pages_written, 30);
    assert_eq!(report.harvested, 15, "pages 10..25, each once: {report:?}");
    // The instruction emulator pushes one entry per write (hardware: one per page).
    assert_eq!(report.entries, 10 * 1026 + 20);
    assert_eq!(
        vmm.harvest().unwrap().harvested,
        0,
        "the run harvested already"
    );
    let report = vmm
        .run(&[Op::Stride {
            first: 1,
            count: 8,
            step: 100,
            value: 1,
        }])
        .unwrap();
    assert_eq!(report.harvested, 8);
}

#[test]
fn a_ring_much_smaller_than_the_writes_loses_nothing() {
    require_kvm!("a_ring_much_smaller_than_the_writes_loses_nothing");
    let dir = TempDir::new("pagefp-vmm-small-ring");
    // 256 entries (KVM's minimum: one page) for 1000 and then 2048 pages.
    let auto = spawn(&dir, "auto", |a| a.ring_entries = 256);
    assert_eq!(auto.run(&[touch(0, 1000, 1)]).unwrap().harvested, 1000);
    let report = auto.run(&[touch(0, 2048, 2)]).unwrap();
    assert_eq!((report.harvested, report.entries), (2048, 2048));
    let mut page = vec![0u8; 4096];
    page[8] = 2;
    let expected = blake3::hash(&page).to_hex().to_string();
    assert!(auto.checksums().unwrap().iter().all(|h| *h == expected));

    // Manual mode: the VMM re-protects when the ring would fill, but keeps
    // every page for the next harvest.
    let manual = spawn(&dir, "manual", |a| {
        a.ring_entries = 256;
        a.harvest = "manual".into();
    });
    assert_eq!(manual.run(&[touch(0, 1000, 1)]).unwrap().harvested, 0);
    let harvest = manual.harvest_list().unwrap();
    assert_eq!(harvest.pages.unwrap(), (0..1000).collect::<Vec<u64>>());
    assert_eq!(harvest.entries, 1000);

    // Whole-page ops push 1024+ entries in one instruction: refused on a ring
    // that cannot take them, with the size that works.
    let err = auto
        .run(&[Op::Random {
            first: 0,
            count: 1,
            seed: 1,
        }])
        .unwrap_err();
    let refused = err.downcast_ref::<Refused>().expect("a refusal");
    assert!(
        refused.error.contains("--ring-entries of at least 2048"),
        "{refused}"
    );
    let big_enough = spawn(&dir, "2048", |a| a.ring_entries = 2048);
    let report = big_enough
        .run(&[
            Op::Random {
                first: 0,
                count: 40,
                seed: 1,
            },
            Op::Zero {
                first: 20,
                count: 40,
            },
        ])
        .unwrap();
    assert_eq!(report.harvested, 60);
    assert_eq!(report.entries, 40 * 1026 + 40 * 1024);
}

#[test]
fn manual_ring_harvest_reports_pages_only_when_asked() {
    require_kvm!("manual_ring_harvest_reports_pages_only_when_asked");
    let dir = TempDir::new("pagefp-vmm-manual");
    let vmm = spawn(&dir, "m", |a| a.harvest = "manual".into());
    assert_eq!(vmm.info().unwrap().harvest, Harvest::Manual);
    let first = vmm.run(&[touch(10, 4, 1)]).unwrap();
    assert_eq!(first.harvested, 0, "manual: runs do not harvest");
    // Written again before re-protection.
    vmm.run(&[touch(12, 4, 2)]).unwrap();
    let harvest = vmm.harvest_list().unwrap();
    assert_eq!(
        harvest.pages.as_deref(),
        Some(&[10, 11, 12, 13, 14, 15][..])
    );
    assert_eq!(harvest.harvested, 6);
    assert_eq!(harvest.entries, 8);
    let again = vmm.harvest_list().unwrap();
    assert_eq!((again.harvested, again.pages.unwrap()), (0, vec![]));
    // Without "list" there is no page list.
    vmm.run(&[touch(0, 1, 1)]).unwrap();
    let plain = vmm.harvest().unwrap();
    assert_eq!((plain.harvested, plain.pages), (1, None));
}

#[test]
fn bitmap_mode_reports_the_same_pages() {
    require_kvm!("bitmap_mode_reports_the_same_pages");
    let dir = TempDir::new("pagefp-vmm-bitmap");
    let auto = spawn(&dir, "auto", |a| {
        a.dirty = "bitmap".into();
        a.slots = 4;
    });
    let info = auto.info().unwrap();
    assert_eq!((info.dirty, info.slots.len()), (DirtyMode::Bitmap, 4));
    // 8 MiB in 4 slots of 512 pages: 500..520 straddles slots 0 and 1.
    let report = auto
        .run(&[
            Op::Copy {
                src: 0,
                first: 500,
                count: 20,
            },
            touch(2047, 1, 1),
        ])
        .unwrap();
    assert_eq!((report.harvested, report.entries), (21, 0));

    let manual = spawn(&dir, "manual", |a| {
        a.dirty = "bitmap".into();
        a.harvest = "manual".into();
        a.slots = 4;
    });
    manual
        .run(&[
            touch(100, 50, 1),
            Op::Stride {
                first: 510,
                count: 4,
                step: 512,
                value: 2,
            },
        ])
        .unwrap();
    let mut expected: Vec<u64> = (100..150).collect();
    expected.extend([510, 1022, 1534, 2046]);
    assert_eq!(manual.harvest_list().unwrap().pages.unwrap(), expected);
    assert_eq!(
        manual.harvest().unwrap().harvested,
        0,
        "a harvest re-protects what it reported"
    );
}

#[test]
fn ring_pages_map_back_through_their_slot() {
    require_kvm!("ring_pages_map_back_through_their_slot");
    let dir = TempDir::new("pagefp-vmm-ring-slots");
    let vmm = spawn(&dir, "s", |a| {
        a.slots = 8;
        a.harvest = "manual".into();
    });
    // 8 MiB in 8 slots of 256 pages: one page in each slot, at offset 3.
    vmm.run(&[Op::Stride {
        first: 3,
        count: 8,
        step: 256,
        value: 1,
    }])
    .unwrap();
    let pages = vmm.harvest_list().unwrap().pages.unwrap();
    assert_eq!(pages, (0..8).map(|s| s * 256 + 3).collect::<Vec<u64>>());
}

#[test]
fn no_dirty_logging_still_runs_ops() {
    require_kvm!("no_dirty_logging_still_runs_ops");
    let dir = TempDir::new("pagefp-vmm-none");
    let vmm = spawn(&dir, "none", |a| a.dirty = "none".into());
    let info = vmm.info().unwrap();
    assert_eq!(info.dirty, DirtyMode::None);
    assert!(
        info.slots.iter().all(|s| s.flags == 0),
        "no KVM_MEM_LOG_DIRTY_PAGES"
    );
    let report = vmm
        .run(&[
            Op::Random {
                first: 0,
                count: 10,
                seed: 1,
            },
            Op::Copy {
                src: 0,
                first: 10,
                count: 10,
            },
        ])
        .unwrap();
    assert_eq!((report.pages_written, report.harvested), (20, 0));
    assert_eq!(vmm.harvest().unwrap().harvested, 0);
    let hashes = vmm.checksums_range(0, 20).unwrap();
    assert!(hashes[10..].iter().all(|h| *h == hashes[0]));
}
