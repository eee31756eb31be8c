//! Booting each guest under QEMU TCG, letting its workload run, and dumping
//! its RAM through QMP; at most `jobs` guests at a time.

use std::{
    collections::VecDeque,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::GuestImage;
use crate::qemu::QemuGuest;

/// How long a guest may take from QEMU's start to its ready marker.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// What `images/init` prints when the workload script ended (it should not).
const WORKLOAD_EXIT: &str = "pagefp-workload-exit";

/// How an image's build went.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Unix time the RAM was dumped.
    pub built_unix: u64,
    /// From QEMU's start to the end of the dump.
    pub seconds: f64,
    /// From QEMU's start to the ready marker.
    pub ready_seconds: f64,
    /// The guest's heartbeat counter when it was stopped.
    pub heartbeat: u64,
}

/// Builds `images` (`jobs` at a time), printing one line per guest;
/// their records, in order, or every failure.
pub fn build_all(
    images: &[&GuestImage],
    logs: &Path,
    run_seconds: u64,
    jobs: usize,
) -> anyhow::Result<Vec<BuildRecord>> {
    let total = images.len();
    let queue: Mutex<VecDeque<(usize, &GuestImage)>> =
        Mutex::new(images.iter().copied().enumerate().collect());
    let results: Mutex<Vec<Option<anyhow::Result<BuildRecord>>>> =
        Mutex::new((0..total).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, total.max(1)) {
            scope.spawn(|| {
                loop {
                    let Some((index, image)) = queue.lock().unwrap().pop_front() else { return };
                    let result = build_one(image, logs, run_seconds);
                    match &result {
                        Ok(record) => println!(
                            "  [{}/{total}] {:<16} {:<9} ready after {:>4.1} s, ran {run_seconds} s, dumped {} MiB: {:>5.1} s",
                            index + 1,
                            image.name,
                            image.workload,
                            record.ready_seconds,
                            image.mem_mib,
                            record.seconds
                        ),
                        Err(err) => println!("  [{}/{total}] {:<16} FAILED: {err:#}", index + 1, image.name),
                    }
                    results.lock().unwrap()[index] = Some(result);
                }
            });
        }
    });
    let mut records = Vec::new();
    let mut failures = Vec::new();
    for (image, result) in images.iter().zip(results.into_inner().unwrap()) {
        match result.expect("every image was built") {
            Ok(record) => records.push(record),
            Err(err) => failures.push(format!("{}: {err:#}", image.name)),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {total} guest image(s) failed:\n  {}\n(consoles and QEMU's messages are in {})",
            failures.len(),
            failures.join("\n  "),
            logs.display()
        );
    }
    Ok(records)
}

/// Boots one guest, waits for its ready marker, lets it run, stops it and
/// dumps its RAM into `image.ram_path` (written aside, then renamed).
pub fn build_one(image: &GuestImage, logs: &Path, run_seconds: u64) -> anyhow::Result<BuildRecord> {
    let started = Instant::now();
    let mut guest = QemuGuest::boot(&image.spec(), logs, &format!("build-{}", image.name), None)?;
    guest.wait_ready(&image.workload, BOOT_TIMEOUT)?;
    let ready_seconds = started.elapsed().as_secs_f64();
    let run_until = Instant::now() + Duration::from_secs(run_seconds);
    while Instant::now() < run_until {
        std::thread::sleep(
            Duration::from_millis(250).min(run_until.saturating_duration_since(Instant::now())),
        );
        let console = guest.serial();
        if let Some(at) = console.find(WORKLOAD_EXIT) {
            bail!(
                "the workload ended early: {:?} (its errors are on the console, {})",
                console[at..].lines().next().unwrap_or_default(),
                guest.serial_path.display()
            );
        }
        if let Some(status) = guest.exited() {
            bail!(
                "QEMU exited ({status}) while the workload ran; console: {}",
                guest.serial_path.display()
            );
        }
    }
    guest.qmp.stop()?;
    let heartbeat = guest
        .heartbeat()
        .filter(|beat| *beat > 0)
        .with_context(|| {
            format!(
                "no heartbeat on the console {}",
                guest.serial_path.display()
            )
        })?;
    let tmp = image.ram_path.with_extension("ram.tmp");
    guest
        .qmp
        .pmemsave(&tmp, u64::from(image.mem_mib) << 20)
        .with_context(|| {
            let free = super::free_bytes(tmp.parent().unwrap_or(Path::new(".")))
                .map(|bytes| format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30)))
                .unwrap_or_else(|err| format!("unknown ({err:#})"));
            format!(
                "dumping the guest's RAM into {} ({free} free there)",
                tmp.display()
            )
        })?;
    guest.quit()?;
    let size = std::fs::metadata(&tmp)
        .with_context(|| format!("QEMU wrote no {}", tmp.display()))?
        .len();
    if size != u64::from(image.mem_mib) << 20 {
        bail!(
            "{} holds {size} bytes, not {} MiB",
            tmp.display(),
            image.mem_mib
        );
    }
    std::fs::rename(&tmp, &image.ram_path)?;
    Ok(BuildRecord {
        built_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs()),
        seconds: started.elapsed().as_secs_f64(),
        ready_seconds,
        heartbeat,
    })
}
