//! The agent on real QEMU with KVM (7.2 and 10.0): QEMU's default dirty
//! bitmap with manual protection and the dirty ring, tracked during a
//! migration driven over QMP, with every hash served clean checked against
//! QEMU's memory; a late agent start and lost events make pages unknown,
//! never stale. See `pagefp_tests::qemu_kvm_tracking`.

use pagefp_tests::{
    agent_process::{AgentOptions, TempDir},
    privileged,
    qemu::QemuBuild,
    qemu_kvm_tracking::{AgentStart, TrackingRun, run},
};

fn kvm_available(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(!privileged::required(), "{test}: /dev/kvm is missing");
    eprintln!("skipped: {test}: no /dev/kvm");
    false
}

/// What every run must show, whatever the mode.
fn assert_never_stale(run: &TrackingRun) {
    println!("{run:?}");
    assert_eq!(
        run.stale_hashes, 0,
        "clean hashes that are not the page: {run:#?}"
    );
    assert_eq!(
        run.clean_after, 0,
        "served clean without a dirty log: {run:#?}"
    );
    assert_eq!(run.tracking_after, "untracked", "{run:#?}");
    if let Some(before) = &run.tracking_before {
        assert_eq!(before, "untracked", "{run:#?}");
        assert_eq!(
            run.clean_before, 0,
            "served clean without a dirty log: {run:#?}"
        );
    }
}

#[test]
fn qemu_kvm_guests_are_tracked_during_migration_and_never_served_stale() {
    let test = "qemu_kvm_guests_are_tracked_during_migration_and_never_served_stale";
    if !kvm_available(test) {
        return;
    }
    let dir = TempDir::new("pagefp-qemu-kvm-tracking");
    for build in QemuBuild::ALL {
        if !build.available() {
            assert!(
                !privileged::required(),
                "{test}: QEMU {} is missing",
                build.version()
            );
            continue;
        }
        for (accel, mode) in [("kvm", "bitmap-mp"), ("kvm,dirty-ring-size=4096", "ring")] {
            let run = run(
                &dir.0,
                build,
                accel,
                AgentStart::BeforeGuest,
                &AgentOptions::default(),
            )
            .unwrap();
            assert_never_stale(&run);
            assert_eq!(run.dirty_mode, mode, "{run:#?}");
            assert_eq!(run.tracking_during, "tracked", "{run:#?}");
            assert_eq!(run.losses, 0, "{run:#?}");
            // How soon pages are clean is the benchmark's figure
            // (`qemu_kvm_tracked`), not a timed assertion here: only that
            // some are, and that nearly all are once the guest is paused.
            assert!(run.unwritten_clean_after_2s > 0, "{run:#?}");
            if run.paused_while_migrating {
                assert!(run.clean_paused * 10 >= run.unwritten_pages * 9, "{run:#?}");
            }
        }
    }
}

#[test]
fn a_late_agent_and_lost_events_make_qemu_kvm_pages_unknown_never_stale() {
    let test = "a_late_agent_and_lost_events_make_qemu_kvm_pages_unknown_never_stale";
    if !kvm_available(test) {
        return;
    }
    let dir = TempDir::new("pagefp-qemu-kvm-late");
    let build = QemuBuild::ALL
        .into_iter()
        .rev()
        .find(|build| build.available())
        .expect("a QEMU build");
    // Started after QEMU: adopted, learnt when the migration re-registers
    // the memory slots, then tracked.
    let late = run(
        &dir.0,
        build,
        "kvm",
        AgentStart::AfterGuest,
        &AgentOptions::default(),
    )
    .unwrap();
    assert_never_stale(&late);
    assert_eq!(late.dirty_mode, "bitmap-mp", "{late:#?}");
    assert_eq!(late.tracking_during, "tracked", "{late:#?}");
    assert!(late.clean_paused > 0, "{late:#?}");
    // A ring buffer of four pages: bitmap chunks (4 KiB each) are lost.
    let lossy = run(
        &dir.0,
        build,
        "kvm",
        AgentStart::BeforeGuest,
        &AgentOptions {
            ring_buffer_bytes: Some(16384),
            ..AgentOptions::default()
        },
    )
    .unwrap();
    assert_never_stale(&lossy);
    assert!(lossy.losses > 0, "no loss recorded: {lossy:#?}");
}
