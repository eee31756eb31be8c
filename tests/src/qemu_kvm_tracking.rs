//! The agent tracking real QEMU guests under KVM: a BIOS guest whose boot
//! sector never stops writing 144 pages ([`page_writer_disk`]), migrated
//! over QMP to a second QEMU at a rate that keeps the migration going, the
//! agent watching. Shared by the integration test and the benchmark.
//!
//! One run: outside the migration the VM must be untracked and nothing
//! served clean; during it, tracked; two seconds after the migration's first
//! dirty sync, the share of the pages the guest does not write that is served
//! clean; with the guest paused, every clean hash is checked against the
//! page in QEMU's memory (`pmemsave`); after the migration is cancelled
//! (dirty logging off), nothing is served clean again.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use agent::api::wire::{PageRecord, state};
use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::json;

use crate::{
    agent_process::{AgentOptions, AgentProcess, free_port},
    qemu::QemuBuild,
    qemu_streams::{BiosGuest, page_writer_disk},
};

/// Guest RAM of a run.
pub const MEM_MIB: u32 = 64;
/// The pages the boot sector writes, round after round (64 KiB to 640 KiB).
pub const WRITTEN: std::ops::Range<u64> = 16..160;
/// The BIOS ROM QEMU maps below 4 GiB (read-only slot).
const BIOS_ROM: (u64, u64) = (0xfffc_0000, 0x4_0000);

/// When the agent starts, relative to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStart {
    /// Before QEMU: the VM is seen from its creation.
    BeforeGuest,
    /// After QEMU started: the VM is adopted, learnt at the migration's start.
    AfterGuest,
}

/// What one run saw.
#[derive(Clone, Debug, Serialize)]
pub struct TrackingRun {
    pub qemu: String,
    pub accel: String,
    pub agent_start: AgentStart,
    pub ring_buffer_bytes: Option<u32>,
    /// The dirty mode the agent reports during the migration.
    pub dirty_mode: String,
    /// `tracking` before the migration (`None`: not listed with its slots
    /// yet, an adopted VM), during it, and after it was cancelled.
    pub tracking_before: Option<String>,
    pub tracking_during: String,
    pub tracking_after: String,
    /// Clean pages of the guest's RAM (the read-only BIOS ROM left out)
    /// before the migration and after it was cancelled.
    pub clean_before: usize,
    pub clean_after: usize,
    /// Pages of the hash list, and those the guest does not write.
    pub pages: usize,
    pub unwritten_pages: usize,
    /// Of those, served clean in a hash list asked for 2 s after the
    /// migration's first dirty sync.
    pub unwritten_clean_after_2s: usize,
    /// `unwritten_clean_after_2s / unwritten_pages`.
    pub tracked_fraction: f64,
    /// Guest paused: pages served clean, and those whose hash differs from
    /// the page.
    pub clean_paused: usize,
    /// The paused hash list was taken before the migration ended.
    pub paused_while_migrating: bool,
    pub stale_hashes: usize,
    /// Losses the agent recorded.
    pub losses: u64,
}

/// Runs QEMU `build` with `accel` (`kvm`, `kvm,dirty-ring-size=N`) under a
/// fresh agent started as `start` says, with `options`; files in `dir`.
pub fn run(
    dir: &Path,
    build: QemuBuild,
    accel: &str,
    start: AgentStart,
    options: &AgentOptions,
) -> anyhow::Result<TrackingRun> {
    let tag = format!(
        "{}-{}-{start:?}-{}",
        build.version(),
        accel.replace([',', '='], "-"),
        options.ring_buffer_bytes.unwrap_or(0)
    );
    // One disk each: QEMU locks its image.
    let boot = |end: &str| -> anyhow::Result<Vec<String>> {
        let disk = dir.join(format!("writer-{end}-{tag}.img"));
        page_writer_disk(&disk)?;
        Ok(vec![
            "-drive".into(),
            format!("file={},format=raw,if=ide", disk.display()),
        ])
    };
    let mut agent = match start {
        AgentStart::BeforeGuest => Some(AgentProcess::start(options)?),
        AgentStart::AfterGuest => None,
    };
    let port = free_port();
    let mut incoming = boot("dst")?;
    incoming.extend(["-incoming".into(), format!("tcp:127.0.0.1:{port}")]);
    let _dest = BiosGuest::start_on(build, accel, dir, &format!("dst-{tag}"), MEM_MIB, &incoming)?;
    let mut source = BiosGuest::start_on(
        build,
        accel,
        dir,
        &format!("src-{tag}"),
        MEM_MIB,
        &boot("src")?,
    )?;
    let pid = source.pid();
    wait_writing(&mut source, dir, &tag)?;
    let agent = match agent.take() {
        Some(agent) => agent,
        None => AgentProcess::start(options)?,
    };

    // Outside migration: no dirty log, so untracked, nothing clean.
    let view = agent.wait_vm(pid, Duration::from_secs(30), "listed", |_| true);
    let (tracking_before, clean_before) = if view["pages"].as_u64() > Some(0) {
        let view = agent.wait_vm(pid, Duration::from_secs(30), "rescanned", |v| {
            v["unverified"].as_u64() > Some(0)
        });
        (
            Some(view["tracking"].as_str().unwrap_or("").to_owned()),
            clean_ram(&agent.hashes(pid)),
        )
    } else {
        (None, 0)
    };

    // A migration that cannot converge while the guest writes: 1 MiB/s and
    // a downtime limit of 1 ms keep QEMU iterating (and syncing, about
    // twice a second: each round sends the 144 written pages).
    source.qmp.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 1 << 20, "downtime-limit": 1})),
    )?;
    source.qmp.migrate(&format!("tcp:127.0.0.1:{port}"))?;
    let first_sync = wait_first_sync(&mut source)?;
    std::thread::sleep(
        (first_sync + Duration::from_secs(2)).saturating_duration_since(Instant::now()),
    );
    // A QEMU gone meanwhile would only show as a VM the agent no longer
    // knows: said as what it is.
    source.still_running("during the migration, before the agent's hash list")?;
    let records = agent.hashes(pid);
    let unwritten: Vec<&PageRecord> = records
        .iter()
        .filter(|r| !WRITTEN.contains(&(r.gpa / 4096)))
        .collect();
    let unwritten_clean_after_2s = unwritten.iter().filter(|r| r.state == state::CLEAN).count();
    let view = agent.vm(pid).context("VM listed during the migration")?;
    let tracking_during = view["tracking"].as_str().unwrap_or("").to_owned();
    let dirty_mode =
        serde_json::from_value::<agent::registry::DirtyMode>(view["dirty_mode"].clone())
            .map_or_else(
                |_| view["dirty_mode"].to_string(),
                |mode| mode.name().to_owned(),
            );

    // Paused: every clean hash must be the page's. QEMU then completes the
    // migration within two rounds (nothing is written any more), which
    // turns dirty logging off: whether the list came before is recorded.
    source.qmp.execute("stop", None)?;
    source.still_running("after it was paused")?;
    let paused = agent.hashes(pid);
    let paused_while_migrating = source.qmp.execute("query-migrate", None)?["status"] == "active";
    let memory = source.dump(&dir.join(format!("{tag}.mem")), u64::from(MEM_MIB) << 20)?;
    let rom_path = dir.join(format!("{tag}.rom"));
    source.qmp.pmemsave_at(&rom_path, BIOS_ROM.0, BIOS_ROM.1)?;
    let rom = std::fs::read(&rom_path)?;
    let page_of = |gpa: u64| -> Option<&[u8]> {
        let at = gpa as usize;
        if gpa >= BIOS_ROM.0 {
            let at = (gpa - BIOS_ROM.0) as usize;
            return rom.get(at..at + 4096);
        }
        memory.get(at..at + 4096)
    };
    let mut stale = Vec::new();
    for record in paused.iter().filter(|r| r.state == state::CLEAN) {
        let page =
            page_of(record.gpa).with_context(|| format!("page {:#x} not dumped", record.gpa))?;
        if *blake3::hash(page).as_bytes() != record.hash {
            stale.push(record.gpa);
        }
    }
    if !stale.is_empty() {
        eprintln!("QEMU {tag}: stale clean hashes at {stale:x?}");
    }
    let clean_paused = count(&paused, state::CLEAN);

    // Cancelled (or completed): dirty logging off, nothing clean any more.
    source.qmp.execute("migrate_cancel", None)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while source.qmp.execute("query-migrate", None)?["status"] == "active" {
        if Instant::now() > deadline {
            bail!("QEMU {tag}: the migration did not stop after migrate_cancel");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    source.qmp.cont()?;
    let view = agent.wait_vm(
        pid,
        Duration::from_secs(30),
        "untracked after the cancel",
        |v| v["tracking"] == "untracked",
    );
    let tracking_after = view["tracking"].as_str().unwrap_or("").to_owned();
    let clean_after = clean_ram(&agent.hashes(pid));
    let losses = agent.status()["registry"]["losses_attributed"]
        .as_u64()
        .unwrap_or(0);
    Ok(TrackingRun {
        qemu: build.version().into(),
        accel: accel.into(),
        agent_start: start,
        ring_buffer_bytes: options.ring_buffer_bytes,
        dirty_mode,
        tracking_before,
        tracking_during,
        tracking_after,
        clean_before,
        clean_after,
        pages: records.len(),
        unwritten_pages: unwritten.len(),
        unwritten_clean_after_2s,
        tracked_fraction: unwritten_clean_after_2s as f64 / unwritten.len().max(1) as f64,
        clean_paused,
        paused_while_migrating,
        stale_hashes: stale.len(),
        losses,
    })
}

fn count(records: &[PageRecord], wanted: u8) -> usize {
    records.iter().filter(|r| r.state == wanted).count()
}

/// Clean pages of the guest's RAM: the BIOS ROM's slot is read-only (the
/// guest cannot write it), so it is clean with or without a dirty log.
fn clean_ram(records: &[PageRecord]) -> usize {
    records
        .iter()
        .filter(|r| r.state == state::CLEAN && r.gpa < BIOS_ROM.0)
        .count()
}

/// Waits until the boot sector runs (its pages' counters move).
fn wait_writing(source: &mut BiosGuest, dir: &Path, tag: &str) -> anyhow::Result<()> {
    let probe = dir.join(format!("probe-{tag}.mem"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let low = source.dump(&probe, 1 << 20)?;
        if WRITTEN.filter(|p| low[*p as usize * 4096] != 0).count() > 100 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("QEMU {tag}: the boot sector did not start writing within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for the migration's first dirty sync (`dirty-sync-count` ≥ 1).
fn wait_first_sync(source: &mut BiosGuest) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = source.qmp.execute("query-migrate", None)?;
        if info["ram"]["dirty-sync-count"].as_u64() >= Some(1) {
            return Ok(Instant::now());
        }
        if matches!(
            info["status"].as_str(),
            Some("failed" | "cancelled" | "completed")
        ) {
            bail!("the migration ended before its first dirty sync: {info}");
        }
        if Instant::now() > deadline {
            bail!("no dirty sync within 30 s: {info}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
