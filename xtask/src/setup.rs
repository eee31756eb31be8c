//! `cargo xtask setup`: installs every prerequisite, idempotently.
//!
//! Each step checks first and only acts when something is missing, printing
//! one line: already ok, installed, or failed with what to do.

mod bpf_linker;
mod cargo_fuzz;
mod qemu10;

use std::{
    fs::{self, OpenOptions},
    os::unix::fs::FileTypeExt as _,
    process::Command,
};

use anyhow::{Context as _, Result, anyhow};

use crate::{
    exec::{self, Fix},
    workspace::Workspace,
};

/// Debian packages the tests, demo and benchmarks use.
pub const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "cpio",
    "busybox-static",
    "prometheus",
    "iproute2",
    // The libvirt tests run their own daemons (`tests/src/libvirt.rs`).
    "libvirt-daemon-system",
    "libvirt-clients",
    // The site catalog tests start their own Redis cluster
    // (`tests/src/redis_cluster.rs`).
    "redis-server",
    "redis-tools",
];

const TRACEFS: Mount = Mount {
    fstype: "tracefs",
    target: "/sys/kernel/tracing",
};
const BPFFS: Mount = Mount {
    fstype: "bpf",
    target: "/sys/fs/bpf",
};

/// What a successful step did.
enum Done {
    AlreadyOk(String),
    Installed(String),
}

type Step = fn(&Workspace) -> Result<Done>;

const STEPS: &[(&str, Step)] = &[
    ("kvm", kvm),
    ("apt packages", apt_packages),
    ("rust-src (nightly)", rust_src),
    ("bpf-linker", bpf_linker::ensure),
    ("QEMU 10.0 (bookworm-backports, beside 7.2)", qemu10::ensure),
    ("tracefs", |_| TRACEFS.ensure()),
    ("bpffs", |_| BPFFS.ensure()),
];

/// The benchmark's extra tool (its fuzz part), installed if missing.
pub fn bench_tools(ws: &Workspace) -> Result<()> {
    match cargo_fuzz::ensure(ws)? {
        Done::AlreadyOk(detail) => println!("[ok]        cargo-fuzz: {detail}"),
        Done::Installed(detail) => println!("[installed] cargo-fuzz: {detail}"),
    }
    Ok(())
}

pub fn run(ws: &Workspace) -> Result<()> {
    println!("==> setup ({})", ws.root().display());
    check_root()?;
    let (mut ok, mut installed, mut failed) = (0, 0, Vec::new());
    for (name, step) in STEPS {
        match step(ws) {
            Ok(Done::AlreadyOk(detail)) => {
                ok += 1;
                println!("[ok]        {name}: {detail}");
            }
            Ok(Done::Installed(detail)) => {
                installed += 1;
                println!("[installed] {name}: {detail}");
            }
            Err(err) => {
                let (causes, fix) = exec::describe(&err);
                println!("[FAILED]    {name}: {causes}");
                if let Some(fix) = fix {
                    println!("            fix: {fix}");
                }
                failed.push(*name);
            }
        }
    }
    println!(
        "setup: {ok} ok, {installed} installed, {} failed",
        failed.len()
    );
    if !failed.is_empty() {
        return Err(anyhow!("setup failed: {}", failed.join(", "))).context(Fix(
            "fix the failed steps listed above, then rerun `cargo xtask setup`".into(),
        ));
    }
    Ok(())
}

/// The cheap part of setup, for verbs that build: the tools a build needs are
/// present and current. Installs nothing.
pub fn check_build_tools(ws: &Workspace) -> Result<()> {
    let missing = || Fix("run `cargo xtask setup`".into());
    if !rust_src_installed()
        .context("rust-src for the nightly toolchain")
        .with_context(missing)?
    {
        return Err(anyhow!(
            "rust-src is not installed for the nightly toolchain"
        ))
        .with_context(missing);
    }
    bpf_linker::check(ws).with_context(missing)
}

fn check_root() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    if euid != "0" {
        return Err(anyhow!("setup must run as root (effective uid is {euid})"))
            .context(Fix("rerun `cargo xtask setup` as root".into()));
    }
    Ok(())
}

fn kvm(_: &Workspace) -> Result<Done> {
    let fix = || {
        Fix("run on a machine with KVM enabled (kvm_intel/kvm_amd loaded, or nested virtualisation on)".into())
    };
    let meta = fs::metadata("/dev/kvm")
        .context("/dev/kvm does not exist")
        .with_context(fix)?;
    if !meta.file_type().is_char_device() {
        return Err(anyhow!("/dev/kvm is not a character device")).with_context(fix);
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("cannot open /dev/kvm read-write")
        .with_context(fix)?;
    Ok(Done::AlreadyOk("/dev/kvm opens read-write".into()))
}

fn apt_packages(_: &Workspace) -> Result<Done> {
    let mut missing = Vec::new();
    for package in APT_PACKAGES {
        if !dpkg_installed(package)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(Done::AlreadyOk(APT_PACKAGES.join(" ")));
    }
    let fix = || {
        Fix(format!(
            "read apt-get's error above, then run `apt-get install {}` by hand",
            missing.join(" ")
        ))
    };
    let apt = || {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    exec::run(apt().arg("update")).with_context(fix)?;
    exec::run(
        apt()
            // libvirt's packages ship conffiles: take the packaged ones
            // instead of prompting.
            .args(["install", "-y", "--no-install-recommends"])
            .args(["-o", "Dpkg::Options::=--force-confnew"])
            .args(&missing),
    )
    .with_context(fix)?;
    for package in &missing {
        if !dpkg_installed(package)? {
            return Err(anyhow!(
                "{package} is still not installed after apt-get install"
            ))
            .with_context(fix);
        }
    }
    Ok(Done::Installed(missing.join(" ")))
}

/// Whether dpkg reports `package` as installed.
fn dpkg_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("cannot run dpkg-query")
        .context(Fix(
            "setup supports Debian-based systems; install the packages by hand".into(),
        ))?;
    // dpkg-query fails for packages it has never heard of: not installed.
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

fn rust_src(_: &Workspace) -> Result<Done> {
    let fix =
        || Fix("install it by hand: `rustup component add rust-src --toolchain nightly`".into());
    match rust_src_installed() {
        Ok(true) => return Ok(Done::AlreadyOk("installed".into())),
        Ok(false) => {
            exec::run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
            .with_context(fix)?;
        }
        Err(err) => {
            // Most likely no nightly toolchain at all: install it with rust-src.
            println!("nightly toolchain: {err:#}");
            exec::run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
            .context(Fix(
                "install it by hand: `rustup toolchain install nightly --component rust-src`"
                    .into(),
            ))?;
        }
    }
    if !rust_src_installed().with_context(fix)? {
        return Err(anyhow!("rust-src is still missing after installing it")).with_context(fix);
    }
    Ok(Done::Installed("rust-src for nightly".into()))
}

fn rust_src_installed() -> Result<bool> {
    let list = exec::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    Ok(list
        .lines()
        .any(|line| line.trim() == "rust-src" || line.trim().starts_with("rust-src-")))
}

/// A pseudo file system that must be mounted.
struct Mount {
    fstype: &'static str,
    target: &'static str,
}

impl Mount {
    fn ensure(&self) -> Result<Done> {
        let Self { fstype, target } = self;
        if self.is_mounted()? {
            return Ok(Done::AlreadyOk(format!("mounted at {target}")));
        }
        let fix = || {
            Fix(format!(
                "mount it by hand: `mount -t {fstype} {fstype} {target}`"
            ))
        };
        exec::run(Command::new("mount").args(["-t", fstype, fstype, target])).with_context(fix)?;
        if !self.is_mounted()? {
            return Err(anyhow!("{fstype} is still not mounted at {target}")).with_context(fix);
        }
        Ok(Done::Installed(format!("mounted at {target}")))
    }

    fn is_mounted(&self) -> Result<bool> {
        let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
        Ok(mounts.lines().any(|line| {
            let mut fields = line.split_whitespace();
            let (_source, target, fstype) = (fields.next(), fields.next(), fields.next());
            target == Some(self.target) && fstype == Some(self.fstype)
        }))
    }
}
