//! Real Linux guest memory images (`cargo xtask images`).
//!
//! Every guest boots the same Debian kernel and the same initramfs (static
//! busybox, perl, python3 with its standard library, and the scripts in
//! `images/`) under QEMU TCG, and runs one workload, chosen on the kernel
//! command line (`pagefp.workload=NAME`, one per `images/workloads/NAME.sh`).
//! Once the workload has run for a while the guest is stopped and its RAM
//! dumped through QMP `pmemsave` into `target/pagefp-images/linux-NAME.ram`
//! (guest physical address 0 onwards, `mem_mib` MiB).
//!
//! Cached: `manifest.json` records each image's inputs (kernel package,
//! initramfs, scripts, QEMU version, memory size, run time) and their digest;
//! an image is rebuilt only when its digest changes or its file is missing.
//! A file lock keeps concurrent callers (tests, demo, bench) from building
//! twice.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! for image in pagefp_images::ensure_images()? {
//!     println!("{} ({}): {}", image.name, image.workload, image.ram_path.display());
//! }
//! # Ok(()) }
//! ```

pub mod build;
pub mod inputs;
pub mod qemu;
pub mod stats;

use std::{
    fmt::Write as _,
    fs::File,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::Context as _;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

pub use self::{build::BuildRecord, stats::PageStats};
use crate::qemu::GuestSpec;

/// Guest RAM of every image.
pub const MEM_MIB: u32 = 256;
/// How long each guest runs its workload before its RAM is dumped
/// (`PAGEFP_IMAGES_RUN_SECONDS` overrides it).
pub const RUN_SECONDS: u64 = 15;
/// Guests booted at a time (`PAGEFP_IMAGES_JOBS` overrides it).
pub const JOBS: usize = 2;
/// The kernel command line, before `pagefp.workload=NAME`.
pub const KERNEL_ARGS: &str = "console=ttyS0 quiet panic=-1";
/// Bumped when the way images are built changes (forces a rebuild).
const BUILDER_VERSION: u32 = 2;

/// One built image, and all it takes to boot the very same guest again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestImage {
    /// `linux-WORKLOAD`.
    pub name: String,
    pub workload: String,
    pub mem_mib: u32,
    /// The RAM dump: `mem_mib` MiB, guest physical address 0 onwards.
    pub ram_path: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line.
    pub append: String,
    /// blake3 (hex, 16 digits) of `inputs`, `workload` and `append`.
    pub digest: String,
    pub inputs: ImageInputs,
    pub build: BuildRecord,
    pub pages: PageStats,
}

/// What an image is made of.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageInputs {
    /// The Debian kernel package's file name and blake3.
    pub kernel_package: String,
    pub kernel_package_blake3: String,
    /// blake3 of `initrd.gz` as QEMU loads it, and its uncompressed size.
    pub initramfs_blake3: String,
    pub initramfs_bytes: u64,
    /// blake3 of `images/init` and `images/workloads/` (also inside the initramfs).
    pub scripts_blake3: String,
    pub qemu_version: String,
    pub run_seconds: u64,
    pub mem_mib: u32,
    pub builder: u32,
}

impl GuestImage {
    /// How to boot this guest again (add `extra` arguments as needed).
    pub fn spec(&self) -> GuestSpec {
        GuestSpec {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            append: self.append.clone(),
            mem_mib: self.mem_mib,
            extra: Vec::new(),
        }
    }

    /// What the guest prints once its workload started.
    pub fn ready_marker(&self) -> String {
        format!("{}{}", crate::qemu::READY, self.workload)
    }
}

/// How [`ensure_with`] builds.
#[derive(Clone, Debug)]
pub struct Options {
    /// Rebuild every image.
    pub force: bool,
    pub run_seconds: u64,
    pub mem_mib: u32,
    /// Guests booted at a time.
    pub jobs: usize,
    /// Print the summary table even when nothing was rebuilt.
    pub print_summary: bool,
}

impl Default for Options {
    /// The defaults, with `PAGEFP_IMAGES_RUN_SECONDS` and `PAGEFP_IMAGES_JOBS`
    /// applied (so the tests, the demo and `cargo xtask images` agree).
    fn default() -> Self {
        let env = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|value| value.parse::<u64>().ok())
        };
        Self {
            force: false,
            run_seconds: env("PAGEFP_IMAGES_RUN_SECONDS").unwrap_or(RUN_SECONDS),
            mem_mib: MEM_MIB,
            jobs: env("PAGEFP_IMAGES_JOBS").map_or(JOBS, |jobs| jobs.max(1) as usize),
            print_summary: false,
        }
    }
}

/// The images, and the figures of the whole set.
#[derive(Default, Serialize, Deserialize)]
struct Manifest {
    builder: u32,
    /// Non-zero pages in all images, and how many distinct contents they hold.
    set_nonzero_pages: u64,
    set_distinct_pages: u64,
    images: Vec<GuestImage>,
}

/// The workspace's target directory (`CARGO_TARGET_DIR`, else `target/`
/// next to the workspace's `Cargo.toml`).
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target")
}

/// `target/pagefp-images`.
pub fn images_dir() -> PathBuf {
    target_dir().join("pagefp-images")
}

/// `images/` in the workspace: init, workload scripts, README.
pub fn sources_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/images/ has a grandparent: the workspace")
        .join("images")
}

/// Builds what is missing or stale (default [`Options`]); every image.
pub fn ensure_images() -> anyhow::Result<Vec<GuestImage>> {
    ensure_with(&Options::default())
}

/// Builds what is missing or stale (everything with `force`); every image,
/// sorted by name.
pub fn ensure_with(options: &Options) -> anyhow::Result<Vec<GuestImage>> {
    let dir = images_dir();
    let inputs_dir = dir.join("inputs");
    let logs = dir.join("logs");
    for dir in [&inputs_dir, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let dir = std::fs::canonicalize(&dir)?;
    let _lock = lock(&dir.join(".lock"))?;

    let qemu_version = inputs::qemu_version()?;
    let kernel = inputs::kernel(&inputs_dir).context("preparing the guest kernel")?;
    let initramfs =
        inputs::initramfs(&inputs_dir, &sources_dir()).context("building the guests' initramfs")?;

    let manifest_path = dir.join("manifest.json");
    let old: Manifest = std::fs::read(&manifest_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let inputs = ImageInputs {
        kernel_package: kernel
            .package
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
        kernel_package_blake3: kernel.package_blake3.clone(),
        initramfs_blake3: initramfs.blake3.clone(),
        initramfs_bytes: initramfs.bytes,
        scripts_blake3: initramfs.scripts_blake3.clone(),
        qemu_version,
        run_seconds: options.run_seconds,
        mem_mib: options.mem_mib,
        builder: BUILDER_VERSION,
    };
    let mut images = Vec::new();
    let mut stale = Vec::new();
    for workload in &initramfs.workloads {
        let name = format!("linux-{workload}");
        let append = format!("{KERNEL_ARGS} pagefp.workload={workload}");
        let digest = {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&serde_json::to_vec(&(&inputs, workload, &append))?);
            hasher.finalize().to_hex()[..16].to_owned()
        };
        let ram_path = dir.join(format!("{name}.ram"));
        let previous = old.images.iter().find(|image| image.name == name);
        let fresh = !options.force
            && previous.is_some_and(|image| {
                image.digest == digest
                    && std::fs::metadata(&ram_path)
                        .is_ok_and(|meta| meta.len() == u64::from(options.mem_mib) << 20)
            });
        if !fresh {
            stale.push(images.len());
        }
        images.push(GuestImage {
            name,
            workload: workload.clone(),
            mem_mib: options.mem_mib,
            ram_path,
            kernel: kernel.vmlinuz.clone(),
            initrd: initramfs.path.clone(),
            append,
            digest,
            inputs: inputs.clone(),
            build: previous
                .map(|image| image.build.clone())
                .unwrap_or_default(),
            pages: previous.map(|image| image.pages).unwrap_or_default(),
        });
    }

    if !stale.is_empty() {
        let started = Instant::now();
        println!(
            "building {} Linux guest image(s) in {}: {} MiB each, QEMU TCG, {} s of workload, {} at a time",
            stale.len(),
            dir.display(),
            options.mem_mib,
            options.run_seconds,
            options.jobs
        );
        let todo: Vec<&GuestImage> = stale.iter().map(|index| &images[*index]).collect();
        check_free_space(&dir, todo.len() as u64 * (u64::from(options.mem_mib) << 20))?;
        let records = build::build_all(&todo, &logs, options.run_seconds, options.jobs)?;
        for (index, record) in stale.iter().zip(records) {
            images[*index].build = record;
        }
        println!("built in {:.0} s", started.elapsed().as_secs_f64());
    }

    let mut manifest = Manifest {
        builder: BUILDER_VERSION,
        set_nonzero_pages: old.set_nonzero_pages,
        set_distinct_pages: old.set_distinct_pages,
        images,
    };
    let figures_stale = manifest.images.len() != old.images.len()
        || manifest.images.iter().any(|image| image.pages.pages == 0);
    if !stale.is_empty() || figures_stale {
        let paths: Vec<&Path> = manifest
            .images
            .iter()
            .map(|image| image.ram_path.as_path())
            .collect();
        let (figures, distinct) = stats::page_stats(&paths)?;
        for (image, pages) in manifest.images.iter_mut().zip(figures) {
            image.pages = pages;
        }
        manifest.set_nonzero_pages = manifest
            .images
            .iter()
            .map(|image| image.pages.nonzero)
            .sum();
        manifest.set_distinct_pages = distinct;
    }
    remove_leftovers(&dir, &manifest.images)?;
    let tmp = manifest_path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::rename(&tmp, &manifest_path)?;
    if !stale.is_empty() || options.print_summary {
        print!("{}", summary(&manifest.images, manifest.set_distinct_pages));
    }
    Ok(manifest.images)
}

/// Room the build needs beside the RAM dumps: consoles, the dump being
/// renamed, and what the tests write next to them.
const FREE_SPACE_MARGIN: u64 = 1 << 30;

/// Bytes free for an unprivileged writer on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("reading the free space of {}", dir.display()))?;
    Ok(stat.blocks_available() * stat.fragment_size())
}

/// Refuses to start a build that cannot fit: QEMU's `pmemsave` on a full
/// disk only says "An IO error has occurred".
fn check_free_space(dir: &Path, dumps: u64) -> anyhow::Result<()> {
    let free = free_bytes(dir)?;
    let needed = dumps + FREE_SPACE_MARGIN;
    if free < needed {
        anyhow::bail!(
            "the guest images need {:.1} GiB free in {} and only {:.1} GiB are: free some space \
             (old clones' target/ directories are the usual culprits) or point \
             CARGO_TARGET_DIR at a larger file system",
            needed as f64 / f64::from(1u32 << 30),
            dir.display(),
            free as f64 / f64::from(1u32 << 30)
        );
    }
    Ok(())
}

/// Holds `path` locked (exclusive) until dropped; says so when it waits.
fn lock(path: &Path) -> anyhow::Result<Flock<File>> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            println!(
                "waiting for another build of the guest images ({} is locked)",
                path.display()
            );
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, errno)| anyhow::anyhow!("locking {}: {errno}", path.display()))
        }
        Err((_, errno)) => Err(anyhow::anyhow!("locking {}: {errno}", path.display())),
    }
}

/// Removes images of workloads that no longer exist, and half-written dumps.
fn remove_leftovers(dir: &Path, images: &[GuestImage]) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let ours =
            name.starts_with("linux-") && (name.ends_with(".ram") || name.ends_with(".ram.tmp"));
        if ours && !images.iter().any(|image| image.ram_path == path) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The table printed after a build: pages per image, and how many of them
/// another image holds too.
pub fn summary(images: &[GuestImage], set_distinct_pages: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<9} {:>4} {:>9} {:>9} {:>9} {:>9}",
        "image", "workload", "MiB", "non-zero", "distinct", "shared", "own"
    );
    for image in images {
        let pages = &image.pages;
        let _ = writeln!(
            out,
            "{:<16} {:<9} {:>4} {:>9} {:>9} {:>9} {:>9}",
            image.name,
            image.workload,
            image.mem_mib,
            pages.nonzero,
            pages.distinct,
            pages.shared,
            pages.own
        );
    }
    let nonzero: u64 = images.iter().map(|image| image.pages.nonzero).sum();
    let total: u64 = images.iter().map(|image| image.pages.pages).sum();
    let _ = writeln!(
        out,
        "{} images: {nonzero} of {total} pages non-zero ({:.0}%), {set_distinct_pages} distinct contents among them \
         (pages: 4 KiB; shared = non-zero pages whose content another image holds)",
        images.len(),
        100.0 * nonzero as f64 / total.max(1) as f64
    );
    out
}
