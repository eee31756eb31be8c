//! Real Linux guest memory images (`cargo xtask images`): the same Debian
//! kernel and initramfs (busybox, perl and the scripts in `images/`) in
//! every guest, one workload each, booted under QEMU TCG, left to run, then
//! dumped through QMP (`pmemsave`) into `target/pagefp-images/<name>.ram`.
//!
//! Cached: `manifest.json` records a digest of every input (kernel package,
//! initramfs, scripts, QEMU version, memory size, run time); an image is
//! rebuilt only when its digest changes. A file lock keeps concurrent
//! callers (tests, demo, bench) from building twice.

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{
    agent_process::target_dir,
    qemu::{GuestSpec, QemuGuest},
};

/// The workloads, one image each (scripts in `images/workloads/`).
pub const WORKLOADS: &[&str] = &["idle", "httpd", "compress", "textproc", "files", "perl", "find"];
pub const MEM_MIB: u32 = 256;
/// How long each guest runs its workload before its RAM is dumped.
pub const RUN_SECONDS: u64 = 15;
/// Bumped when the way images are built changes.
const BUILDER_VERSION: u32 = 1;

/// One built image and how to boot the same guest again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestImage {
    pub name: String,
    pub workload: String,
    pub mem_mib: u32,
    pub ram_path: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub digest: String,
    pub nonzero_pages: u64,
}

impl GuestImage {
    pub fn spec(&self) -> GuestSpec {
        GuestSpec {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            append: self.append.clone(),
            mem_mib: self.mem_mib,
            extra: Vec::new(),
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Manifest {
    images: BTreeMap<String, GuestImage>,
}

pub fn images_dir() -> PathBuf {
    target_dir().join("pagefp-images")
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Builds what is missing or stale; returns every image.
pub fn ensure_images() -> anyhow::Result<Vec<GuestImage>> {
    ensure(false)
}

/// `force`: rebuild every image.
pub fn ensure(force: bool) -> anyhow::Result<Vec<GuestImage>> {
    let dir = images_dir();
    std::fs::create_dir_all(dir.join("inputs"))?;
    let lock = std::fs::File::create(dir.join(".lock"))?;
    // SAFETY: flock on a file descriptor we own; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking {}", dir.display());
    }
    let kernel = kernel(&dir.join("inputs"))?;
    let initrd = initramfs(&dir.join("inputs"))?;
    let qemu = qemu_version()?;
    let manifest_path = dir.join("manifest.json");
    let mut manifest: Manifest = std::fs::read(&manifest_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut inputs = blake3::Hasher::new();
    inputs.update(&std::fs::read(&kernel.1)?);
    inputs.update(&std::fs::read(&initrd.1)?);
    inputs.update(qemu.as_bytes());
    inputs.update(&BUILDER_VERSION.to_le_bytes());
    inputs.update(&MEM_MIB.to_le_bytes());
    inputs.update(&RUN_SECONDS.to_le_bytes());
    let mut wanted = Vec::new();
    for workload in WORKLOADS {
        let mut hasher = inputs.clone();
        hasher.update(workload.as_bytes());
        let digest = hasher.finalize().to_hex()[..16].to_string();
        let name = format!("linux-{workload}");
        let ram_path = dir.join(format!("{name}.ram"));
        let fresh = manifest.images.get(&name).is_some_and(|image| {
            image.digest == digest
                && std::fs::metadata(&image.ram_path).is_ok_and(|m| m.len() == u64::from(MEM_MIB) << 20)
        });
        let image = GuestImage {
            name: name.clone(),
            workload: workload.to_string(),
            mem_mib: MEM_MIB,
            ram_path,
            kernel: kernel.0.clone(),
            initrd: initrd.0.clone(),
            append: format!("console=ttyS0 quiet panic=-1 pagefp.workload={workload}"),
            digest,
            nonzero_pages: manifest.images.get(&name).map_or(0, |i| i.nonzero_pages),
        };
        wanted.push((image, force || !fresh));
    }
    let stale: Vec<&GuestImage> = wanted.iter().filter(|(_, stale)| *stale).map(|(i, _)| i).collect();
    if !stale.is_empty() {
        println!(
            "building {} guest image(s) of {MEM_MIB} MiB under QEMU TCG ({RUN_SECONDS} s of workload each, two at a time)",
            stale.len()
        );
        let started = Instant::now();
        let results: Vec<anyhow::Result<u64>> = std::thread::scope(|scope| {
            let chunks: Vec<Vec<&GuestImage>> = stale.chunks(stale.len().div_ceil(2)).map(<[_]>::to_vec).collect();
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    let dir = &dir;
                    scope.spawn(move || chunk.into_iter().map(|image| build_one(image, dir)).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("image builder panicked")).collect()
        });
        let mut built = results.into_iter();
        for (image, stale) in &mut wanted {
            if *stale {
                image.nonzero_pages = built.next().expect("one result per stale image")?;
            }
        }
        println!("guest images built in {:.0} s", started.elapsed().as_secs_f64());
    }
    manifest.images = wanted.iter().map(|(i, _)| (i.name.clone(), i.clone())).collect();
    let mut file = std::fs::File::create(&manifest_path)?;
    file.write_all(&serde_json::to_vec_pretty(&manifest)?)?;
    Ok(wanted.into_iter().map(|(i, _)| i).collect())
}

/// Boots one guest, lets its workload run, dumps its RAM; returns its
/// non-zero pages.
fn build_one(image: &GuestImage, dir: &Path) -> anyhow::Result<u64> {
    let started = Instant::now();
    let mut guest = QemuGuest::boot(&image.spec(), dir, &format!("build-{}", image.name), None)?;
    guest
        .wait_serial(&format!("pagefp-ready {}", image.workload), Duration::from_secs(180))
        .with_context(|| format!("booting {}", image.name))?;
    std::thread::sleep(Duration::from_secs(RUN_SECONDS));
    guest.qmp.execute("stop", None)?;
    let tmp = image.ram_path.with_extension("ram.tmp");
    guest.qmp.execute(
        "pmemsave",
        Some(serde_json::json!({"val": 0, "size": u64::from(image.mem_mib) << 20, "filename": tmp})),
    )?;
    drop(guest);
    std::fs::rename(&tmp, &image.ram_path)?;
    let bytes = std::fs::read(&image.ram_path)?;
    let nonzero = bytes.chunks(4096).filter(|p| p.iter().any(|b| *b != 0)).count() as u64;
    println!(
        "  {:<16} {:<9} {} MiB, {nonzero} non-zero pages, {:.0} s",
        image.name,
        image.workload,
        image.mem_mib,
        started.elapsed().as_secs_f64()
    );
    Ok(nonzero)
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<String> {
    let output = command.output().with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// (vmlinuz, the .deb it came from): Debian's current 6.1 kernel.
fn kernel(inputs: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let find_deb = || -> Option<PathBuf> {
        std::fs::read_dir(inputs).ok()?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("linux-image-"))
                && p.extension().is_some_and(|e| e == "deb")
        })
    };
    let deb = match find_deb() {
        Some(deb) => deb,
        None => {
            let depends = run(
                Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
                "apt-cache depends linux-image-amd64 (a Debian host is needed)",
            )?;
            let package = depends
                .lines()
                .find_map(|l| l.trim().strip_prefix("Depends: "))
                .context("apt-cache names no kernel package for linux-image-amd64")?
                .to_string();
            println!("downloading the guest kernel {package}");
            run(
                Command::new("apt-get").args(["download", &package]).current_dir(inputs),
                "apt-get download (run `apt-get update` if the package is not found)",
            )?;
            find_deb().context("apt-get download left no .deb")?
        }
    };
    let root = inputs.join("kernel");
    let vmlinuz = |root: &Path| -> Option<PathBuf> {
        std::fs::read_dir(root.join("boot")).ok()?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
    };
    if vmlinuz(&root).is_none() {
        std::fs::create_dir_all(&root)?;
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root), "dpkg -x on the kernel package")?;
    }
    Ok((vmlinuz(&root).context("no vmlinuz in the kernel package")?, deb))
}

/// (initrd.gz, same path): busybox, perl with its libraries, init and workloads.
fn initramfs(inputs: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let images = workspace_root().join("images");
    let root = inputs.join("rootfs");
    let _ = std::fs::remove_dir_all(&root);
    for dir in ["bin", "sbin", "proc", "sys", "dev", "tmp", "etc", "usr/bin", "workloads"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    let busybox = which::which("busybox").context("busybox is missing: run `cargo xtask setup` (busybox-static)")?;
    std::fs::copy(&busybox, root.join("bin/busybox"))?;
    let perl = which::which("perl").context("perl is missing")?;
    std::fs::copy(&perl, root.join("usr/bin/perl"))?;
    let ldd = run(Command::new("ldd").arg(&perl), "ldd perl")?;
    for library in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let target = root.join(library.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap())?;
        std::fs::copy(std::fs::canonicalize(library)?, &target)?;
    }
    std::fs::copy(images.join("init"), root.join("init"))?;
    run(Command::new("chmod").arg("755").arg(root.join("init")), "chmod")?;
    for entry in std::fs::read_dir(images.join("workloads"))? {
        let path = entry?.path();
        std::fs::copy(&path, root.join("workloads").join(path.file_name().unwrap()))?;
    }
    let initrd = inputs.join("initrd.gz");
    // Fixed timestamps and sorted names: the same inputs give the same bytes.
    run(
        Command::new("sh").arg("-c").arg(format!(
            "cd {} && find . -exec touch -h -d @0 {{}} + && find . | LC_ALL=C sort | cpio -o -H newc --reproducible 2>/dev/null | gzip -9n > {}",
            root.display(),
            initrd.display()
        )),
        "building the initramfs (cpio, gzip)",
    )?;
    Ok((initrd.clone(), initrd))
}

fn qemu_version() -> anyhow::Result<String> {
    let version = run(
        Command::new("qemu-system-x86_64").arg("--version"),
        "qemu-system-x86_64 --version (install QEMU: cargo xtask setup)",
    )?;
    Ok(version.lines().next().unwrap_or_default().to_string())
}
