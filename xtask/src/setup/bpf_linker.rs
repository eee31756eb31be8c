//! bpf-linker, built against the nightly toolchain's own LLVM and installed
//! under `target/tools`.
//!
//! bpf-linker must use the same LLVM major version as the rustc that emits the
//! eBPF bitcode, so it is built with `--features llvm-<major>` against the
//! nightly's `libLLVM.so`, and rebuilt whenever the nightly changes: a stamp
//! file records which nightly (commit hash) the installed binary was built for.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow};

use super::Done;
use crate::{
    exec::{self, Fix},
    workspace::Workspace,
};

/// The bpf-linker release to install (known to build and work with LLVM 22).
pub const VERSION: &str = "0.13.0";

/// What bpf-linker must be built for.
struct Nightly {
    commit_hash: String,
    llvm_major: u32,
    /// `rustc +nightly --print sysroot`; its `lib/` holds `libLLVM.so.<major>.*-rust-*`.
    sysroot: PathBuf,
}

impl Nightly {
    fn query() -> Result<Self> {
        let version = exec::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
        let field = |name: &str| {
            version
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
                .with_context(|| format!("no `{name}` line in `rustc +nightly -vV`"))
        };
        let commit_hash = field("commit-hash:")?.to_owned();
        let llvm = field("LLVM version:")?;
        let llvm_major = llvm
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .with_context(|| format!("cannot read the LLVM major version from `{llvm}`"))?;
        let sysroot = exec::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
        Ok(Self {
            commit_hash,
            llvm_major,
            sysroot: PathBuf::from(sysroot.trim()),
        })
    }

    fn lib_dir(&self) -> PathBuf {
        self.sysroot.join("lib")
    }

    /// The stamp contents for a bpf-linker built for this nightly.
    fn stamp(&self) -> String {
        format!(
            "bpf-linker {VERSION}\nnightly rustc commit-hash: {}\nLLVM major: {}\n",
            self.commit_hash, self.llvm_major
        )
    }

    /// The nightly's `libLLVM.so.<major>.*-rust-*`.
    fn libllvm(&self) -> Result<PathBuf> {
        let dir = self.lib_dir();
        let prefix = format!("libLLVM.so.{}.", self.llvm_major);
        let mut found: Vec<PathBuf> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|entry| entry.ok())
            .filter(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.starts_with(&prefix) && name.contains("-rust-")
            })
            .map(|entry| entry.path())
            .collect();
        found.sort();
        found
            .pop()
            .with_context(|| format!("no {prefix}*-rust-* in {}", dir.display()))
    }
}

fn binary(ws: &Workspace) -> PathBuf {
    ws.tools_bin().join("bpf-linker")
}

fn stamp_path(ws: &Workspace) -> PathBuf {
    ws.tools_dir().join("bpf-linker.stamp")
}

/// Why the installed bpf-linker cannot be used as it is, if it cannot.
fn outdated(ws: &Workspace, nightly: &Nightly) -> Option<String> {
    let binary = binary(ws);
    if !binary.exists() {
        return Some(format!("{} is not installed", binary.display()));
    }
    if let Err(err) = exec::output(Command::new(&binary).arg("--version")) {
        return Some(format!("{} does not run ({err:#})", binary.display()));
    }
    match fs::read_to_string(stamp_path(ws)) {
        Ok(stamp) if stamp == nightly.stamp() => None,
        Ok(_) => Some("it was built for another nightly or version".into()),
        Err(_) => Some(format!("{} is missing", stamp_path(ws).display())),
    }
}

/// Cheap check for builds: bpf-linker is installed and current.
pub fn check(ws: &Workspace) -> Result<()> {
    let nightly = Nightly::query()?;
    match outdated(ws, &nightly) {
        None => Ok(()),
        Some(why) => Err(anyhow!("bpf-linker is not ready: {why}")),
    }
}

/// Setup step: builds and installs bpf-linker unless it is current.
pub fn ensure(ws: &Workspace) -> Result<Done> {
    let nightly = Nightly::query().context(Fix(
        "run `cargo xtask setup` again once rust-src (nightly) is ok".into(),
    ))?;
    let what = format!(
        "{VERSION} for LLVM {}, in {}",
        nightly.llvm_major,
        ws.tools_bin().display()
    );
    let Some(why) = outdated(ws, &nightly) else {
        return Ok(Done::AlreadyOk(what));
    };
    println!("bpf-linker: building it because {why}");
    install(ws, &nightly).context(Fix(
        "read the error above (network access to crates.io and a C compiler are needed), then rerun `cargo xtask setup`"
            .into(),
    ))?;
    Ok(Done::Installed(what))
}

fn install(ws: &Workspace, nightly: &Nightly) -> Result<()> {
    let tools = ws.tools_dir();
    let llvm_prefix = tools.join("llvm");
    let llvm_lib = llvm_prefix.join("lib");
    fs::create_dir_all(&llvm_lib).with_context(|| format!("creating {}", llvm_lib.display()))?;
    let libllvm = nightly.libllvm()?;
    relink(&libllvm, &llvm_lib.join("libLLVM.so"))?;

    // No stamp while the binary may be half-installed.
    let stamp = stamp_path(ws);
    if stamp.exists() {
        fs::remove_file(&stamp).with_context(|| format!("removing {}", stamp.display()))?;
    }

    let mut cmd = Command::new("cargo");
    cmd.arg("install")
        .arg("--root")
        .arg(&tools)
        .args(["--version", VERSION, "--locked", "--force"])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{}", nightly.llvm_major))
        .arg("bpf-linker")
        .env("LLVM_PREFIX", &llvm_prefix)
        // The binary loads the nightly's libLLVM at run time: find it without
        // LD_LIBRARY_PATH (rustup sets that only for its own proxies).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("-Clink-arg=-Wl,-rpath,{}", nightly.lib_dir().display()),
        )
        .env_remove("RUSTFLAGS");
    exec::run(&mut cmd)?;

    let binary = binary(ws);
    exec::output(Command::new(&binary).arg("--version"))
        .with_context(|| format!("the new {} does not run", binary.display()))?;
    fs::write(&stamp, nightly.stamp()).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

/// Makes `link` a symlink to `target`, replacing whatever was there.
fn relink(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
    }
    symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}
