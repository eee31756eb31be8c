//! `cargo xtask images`: setup, release build, then `pagefp-images`, which
//! boots the Linux guests under QEMU TCG and dumps their RAM into
//! `target/pagefp-images/` (cached: a no-op while the inputs are unchanged).
//! `test`, `demo` and `bench` build the images first too.

use anyhow::{Context as _, Result};

use crate::{
    exec::{self, Fix},
    run_bin,
    workspace::Workspace,
};

/// The package whose integration tests load the images.
const TESTS_PACKAGE: &str = "pagefp-tests";

/// The verb: `args` go to `pagefp-images` (`--force`, `--run-seconds N`, `--jobs N`).
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    run_bin::run(ws, run_bin::IMAGES, args)
}

/// Before `cargo xtask test` runs the tests (setup and build done): builds
/// the images with the tests' profile, unless the user picked packages
/// without `pagefp-tests`.
pub fn before_tests(ws: &Workspace, cargo_args: &[String]) -> Result<()> {
    if !tests_selected(cargo_args) {
        return Ok(());
    }
    let mut cmd = ws.cargo("run");
    cmd.args(profile_args(cargo_args)).args([
        "--quiet",
        "-p",
        run_bin::IMAGES_PACKAGE,
        "--bin",
        run_bin::IMAGES,
    ]);
    exec::run(&mut cmd).context(Fix(
        "the Linux guest images could not be built (see above): `cargo xtask setup` installs QEMU, busybox and cpio; \
         `cargo xtask images -- --force` rebuilds the images from scratch"
            .into(),
    ))
}

/// Whether the tests of `pagefp-tests` run: no package picked, or it among them.
fn tests_selected(cargo_args: &[String]) -> bool {
    let mut picked = Vec::new();
    let mut args = cargo_args.iter();
    while let Some(arg) = args.next() {
        if arg == "-p" || arg == "--package" {
            picked.extend(args.next().cloned());
        } else if let Some(name) = arg.strip_prefix("--package=") {
            picked.push(name.to_owned());
        } else if let Some(name) = arg.strip_prefix("-p").filter(|_| !arg.starts_with("--")) {
            picked.push(name.to_owned());
        }
    }
    picked.is_empty() || picked.iter().any(|name| name == TESTS_PACKAGE)
}

/// `--release` / `--profile NAME` from the user's `cargo test` arguments.
fn profile_args(cargo_args: &[String]) -> Vec<String> {
    let mut kept = Vec::new();
    let mut args = cargo_args.iter();
    while let Some(arg) = args.next() {
        if arg == "--release" || arg == "-r" || arg.starts_with("--profile=") {
            kept.push(arg.clone());
        } else if arg == "--profile" {
            kept.push(arg.clone());
            kept.extend(args.next().cloned());
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| (*arg).to_owned()).collect()
    }

    #[test]
    fn images_only_when_the_tests_package_runs() {
        assert!(tests_selected(&[]));
        assert!(tests_selected(&strings(&["--workspace", "--release"])));
        assert!(tests_selected(&strings(&["-p", "pagefp-tests"])));
        assert!(tests_selected(&strings(&[
            "-p",
            "agent",
            "--package=pagefp-tests"
        ])));
        assert!(!tests_selected(&strings(&["-p", "agent"])));
        assert!(!tests_selected(&strings(&["-pagent"])));
    }

    #[test]
    fn profile_follows_the_tests() {
        assert!(profile_args(&strings(&["-p", "x", "--lib"])).is_empty());
        assert_eq!(profile_args(&strings(&["-r"])), strings(&["-r"]));
        assert_eq!(
            profile_args(&strings(&["--profile", "ci", "--release"])),
            strings(&["--profile", "ci", "--release"])
        );
    }
}
