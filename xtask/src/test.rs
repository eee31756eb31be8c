//! `cargo xtask test`: setup, build, then every test on one test thread
//! (privileged integration tests share the kernel: KVM, eBPF, namespaces).

use std::env;

use anyhow::{Context as _, Result};

use crate::{
    cargo_build,
    exec::{self, Fix},
    images, setup,
    workspace::{self, Workspace},
};

/// Set for the tests when `CI=true`: they fail instead of skipping when KVM or
/// eBPF is unavailable.
const REQUIRE_PRIVILEGED: &str = "PAGEFP_REQUIRE_PRIVILEGED";

/// `args`: what followed `--`, i.e. `cargo test` arguments, optionally followed
/// by `--` and test-binary arguments.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    let (cargo_args, harness_args) = match args.iter().position(|arg| arg == "--") {
        Some(split) => (&args[..split], &args[split + 1..]),
        None => (args, &[][..]),
    };

    setup::run(ws)?;

    let mut selection = default_selection(cargo_args);
    selection.extend(build_args(cargo_args));
    cargo_build::build(ws, &selection)?;
    // The tests load the Linux guest images: build them (cached) before.
    images::before_tests(ws, cargo_args)?;

    let mut cmd = ws.cargo("test");
    cmd.arg("--no-fail-fast")
        .args(default_selection(cargo_args))
        .args(cargo_args)
        .arg("--");
    if !harness_args
        .iter()
        .any(|arg| arg.starts_with("--test-threads"))
    {
        cmd.arg("--test-threads=1");
    }
    cmd.args(harness_args);
    if is_ci() {
        cmd.env(REQUIRE_PRIVILEGED, "1");
    }
    exec::run(&mut cmd).context(Fix(
        "see the failures above (`test result: FAILED` lines); rerun one with `cargo xtask test -- -p PACKAGE -- NAME`"
            .into(),
    ))
}

fn is_ci() -> bool {
    env::var("CI").is_ok_and(|ci| ci.eq_ignore_ascii_case("true") || ci == "1")
}

/// `--workspace --exclude <BPF-only packages>`, unless the user picked
/// packages (`cargo` ignores `-p` next to `--workspace`). If the user passed
/// `--workspace` already, only the exclusions are added.
fn default_selection(cargo_args: &[String]) -> Vec<String> {
    let picks_packages = cargo_args.iter().any(|arg| {
        arg == "--package"
            || arg.starts_with("--package=")
            || (arg.starts_with("-p") && !arg.starts_with("--"))
    });
    if picks_packages {
        return Vec::new();
    }
    let mut selection = workspace::workspace_selection();
    if cargo_args
        .iter()
        .any(|arg| arg == "--workspace" || arg == "--all")
    {
        selection.retain(|arg| arg != "--workspace");
    }
    selection
}

/// The user's `cargo test` arguments that also decide what `cargo build`
/// builds: packages, features and profile.
fn build_args(cargo_args: &[String]) -> Vec<String> {
    const FLAGS: &[&str] = &[
        "--workspace",
        "--all",
        "--release",
        "-r",
        "--all-features",
        "--no-default-features",
    ];
    const WITH_VALUE: &[&str] = &[
        "-p",
        "--package",
        "--exclude",
        "-F",
        "--features",
        "--profile",
    ];
    let mut kept = Vec::new();
    let mut args = cargo_args.iter();
    while let Some(arg) = args.next() {
        if FLAGS.contains(&arg.as_str()) {
            kept.push(arg.clone());
        } else if WITH_VALUE.contains(&arg.as_str()) {
            kept.push(arg.clone());
            kept.extend(args.next().cloned());
        } else if WITH_VALUE.iter().any(|flag| {
            // `--package=x`, `-px`.
            arg.strip_prefix(flag).is_some_and(|rest| {
                if flag.starts_with("--") {
                    rest.starts_with('=')
                } else {
                    !rest.is_empty()
                }
            })
        }) {
            kept.push(arg.clone());
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
    fn selection_defaults_to_workspace_without_bpf_crates() {
        assert_eq!(
            default_selection(&[]),
            strings(&["--workspace", "--exclude", "agent-ebpf"])
        );
        assert_eq!(
            default_selection(&strings(&["--workspace"])),
            strings(&["--exclude", "agent-ebpf"])
        );
        assert!(default_selection(&strings(&["-p", "agent"])).is_empty());
        assert!(default_selection(&strings(&["-pagent"])).is_empty());
        assert!(default_selection(&strings(&["--package=agent"])).is_empty());
        assert_eq!(default_selection(&strings(&["--profile", "x"])).len(), 3);
    }

    #[test]
    fn build_args_keep_only_what_decides_the_build() {
        let args = strings(&[
            "-p",
            "agent",
            "--lib",
            "--features=x",
            "-Fy",
            "--release",
            "--doc",
            "--package=b",
        ]);
        assert_eq!(
            build_args(&args),
            strings(&[
                "-p",
                "agent",
                "--features=x",
                "-Fy",
                "--release",
                "--package=b"
            ])
        );
    }
}
