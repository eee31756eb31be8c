//! `cargo xtask demo` and `cargo xtask bench`: setup, release build, then one
//! binary of the `pagefp-bench` package (`cargo xtask images`: of
//! `pagefp-images`) with the user's arguments.

use anyhow::{Context as _, Result, anyhow};
use serde_json::Value;

use crate::{
    cargo_build,
    exec::{self, Fix},
    setup,
    workspace::{self, Workspace},
};

pub const DEMO: &str = "pagefp-demo";
pub const BENCH: &str = "pagefp-bench";
pub const IMAGES: &str = "pagefp-images";
/// The package of the demo and benchmark binaries (`tests/bench`).
pub const BENCH_PACKAGE: &str = "pagefp-bench";
/// The package of the guest-image builder (`tests/images`).
pub const IMAGES_PACKAGE: &str = "pagefp-images";

/// The package that holds `bin`.
pub fn package(bin: &str) -> &'static str {
    match bin {
        IMAGES => IMAGES_PACKAGE,
        _ => BENCH_PACKAGE,
    }
}

pub fn run(ws: &Workspace, bin: &str, args: &[String]) -> Result<()> {
    // Fail before the slow steps if there is nothing to run.
    ensure_bin_exists(ws, bin)?;
    setup::run(ws)?;
    // The binaries start the agent (`pagefp`) and the test VMM: build them all.
    let mut build_args = workspace::workspace_selection();
    build_args.push("--release".into());
    cargo_build::build(ws, &build_args)?;
    exec::run(
        ws.cargo("run")
            .args([
                "--release",
                "--quiet",
                "-p",
                package(bin),
                "--bin",
                bin,
                "--",
            ])
            .args(args),
    )
    .context(Fix(format!(
        "see {bin}'s output above; `cargo xtask {} -- --help` lists its options",
        verb(bin)
    )))
}

fn verb(bin: &str) -> &'static str {
    match bin {
        BENCH => "bench",
        IMAGES => "images",
        _ => "demo",
    }
}

fn ensure_bin_exists(ws: &Workspace, bin: &str) -> Result<()> {
    let package_name = package(bin);
    let metadata = exec::output(
        ws.cargo("metadata")
            .args(["--no-deps", "--format-version", "1"]),
    )?;
    let metadata: Value = serde_json::from_str(&metadata).context("parsing `cargo metadata`")?;
    let package = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == package_name)
        .with_context(|| format!("package {package_name} is not in the workspace"))?;
    let has_bin = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|target| {
            target["name"] == bin
                && target["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"))
        });
    if !has_bin {
        return Err(anyhow!(
            "package {package_name} has no binary target `{bin}` yet"
        ))
        .context(Fix(format!(
            "add a binary target `{bin}` to the package {package_name} (its Cargo.toml is under tests/)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_binary_is_run_from_its_package() {
        assert_eq!(package(DEMO), BENCH_PACKAGE);
        assert_eq!(package(BENCH), BENCH_PACKAGE);
        assert_eq!(package(IMAGES), IMAGES_PACKAGE);
    }
}
