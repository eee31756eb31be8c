//! Builds the eBPF programs (`agent-ebpf`) for the bpfel target with aya-build
//! and leaves the object in OUT_DIR, where `agent/src/ebpf` embeds it.

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata {
        packages,
        workspace_root,
        ..
    } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    // bpf-linker is installed inside the project by `cargo xtask setup`.
    let tools = workspace_root.join("target/tools/bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths: Vec<PathBuf> = vec![tools.clone().into()];
    paths.extend(env::split_paths(&path));
    let joined = env::join_paths(paths).context("PATH")?;
    // SAFETY: build scripts are single-threaded; nothing reads the
    // environment concurrently.
    unsafe { env::set_var("PATH", joined) };
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker not found in {tools} or PATH: run `cargo xtask setup` first"
        ));
    }
    // aya-build watches the eBPF package only; the programs also compile
    // agent-common (the event layout), so a change there must rebuild them.
    let common = packages
        .iter()
        .find(|p| p.name.as_str() == "agent-common")
        .ok_or_else(|| anyhow!("agent-common package not found in the workspace"))?;
    if let Some(dir) = common.manifest_path.parent() {
        println!("cargo:rerun-if-changed={dir}");
    }
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("agent-ebpf manifest has no parent directory"))?
        .to_string();
    aya_build::build_ebpf(
        [Package {
            name: "agent-ebpf",
            root_dir: &root_dir,
            ..Package::default()
        }],
        Toolchain::default(),
    )
}

fn which_bpf_linker() -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
