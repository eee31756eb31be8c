//! qemu_kvm_tracked and qemu_kvm_stale_hashes: real QEMU guests under KVM
//! (7.2 and 10.0; QEMU's default dirty bitmap with manual protection, and
//! the dirty ring) migrating over QMP with the agent watching, as
//! `pagefp_tests::qemu_kvm_tracking` runs them: the share of the pages the
//! guest does not write that a hash list asked for 2 s after the
//! migration's first dirty sync serves clean, and the clean hashes that
//! differ from the page with the guest paused.

use pagefp_tests::{
    agent_process::{AgentOptions, TempDir},
    qemu::QemuBuild,
    qemu_kvm_tracking::{AgentStart, run},
};
use serde_json::json;

use super::{Figure, median, spread};

pub fn measure(rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let dir = TempDir::new("pagefp-bench-qemu-kvm");
    let mut modes = Vec::new();
    let mut worst = f64::INFINITY;
    let mut stale = 0;
    let mut runs = Vec::new();
    for build in QemuBuild::ALL.into_iter().filter(|build| build.available()) {
        for accel in ["kvm", "kvm,dirty-ring-size=4096"] {
            let mut fractions = Vec::new();
            let mut mode = String::new();
            for round in 0..rounds {
                let run = run(
                    &dir.0,
                    build,
                    accel,
                    AgentStart::BeforeGuest,
                    &AgentOptions::default(),
                )?;
                println!(
                    "  QEMU {} -accel {accel} round {round}: {} ({}), {:.3} of {} unwritten pages clean 2 s after the first sync, {} stale",
                    build.version(),
                    run.dirty_mode,
                    run.tracking_during,
                    run.tracked_fraction,
                    run.unwritten_pages,
                    run.stale_hashes
                );
                fractions.push(run.tracked_fraction);
                stale += run.stale_hashes;
                mode.clone_from(&run.dirty_mode);
                runs.push(run);
            }
            worst = worst.min(median(&mut fractions.clone()));
            modes.push(json!({
                "qemu": build.version(), "accel": accel, "dirty_mode": mode,
                "tracked_fraction": spread(&fractions),
            }));
        }
    }
    Ok(vec![
        Figure::at_least(
            "qemu_kvm_tracked",
            worst,
            0.9,
            "ratio",
            json!({"note": "median over rounds, worst of the QEMU/dirty-mode pairs", "modes": modes, "runs": runs}),
        ),
        Figure::at_most(
            "qemu_kvm_stale_hashes",
            stale as f64,
            0.0,
            "pages",
            json!({"note": "clean hashes that differ from the page, guest paused, every run"}),
        ),
    ])
}
