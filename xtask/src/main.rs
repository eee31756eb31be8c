//! `cargo xtask`: pagefp's setup, build, test, demo and benchmark tasks.
//!
//! One module per verb; every external command is printed before it runs
//! (`==> ...`), and every error ends with a line saying what to do.

mod cargo_build;
mod exec;
mod images;
mod run_bin;
mod setup;
mod test;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::workspace::Workspace;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "pagefp's development tasks"
)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install every prerequisite (packages, rust-src, bpf-linker, mounts); safe to repeat.
    Setup,
    /// Build the workspace, eBPF programs included.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, build the guest images, then run every test on one test thread.
    ///
    /// Arguments after `--` go to `cargo test`, and after a second `--` to the
    /// test binaries, e.g. `cargo xtask test -- -p agent -- --nocapture`.
    Test {
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        args: Vec<String>,
    },
    /// Set up, build, then build the Linux guest images (cached; `-- --force` rebuilds).
    ///
    /// `target/pagefp-images/`: Debian's kernel and a busybox/perl/python
    /// initramfs booted under QEMU TCG, one workload per guest, RAM dumped
    /// through QMP. Options after `--`: `--force`, `--run-seconds N`, `--jobs N`.
    Images {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, build the guest images, then run the demo (`pagefp-demo`) with the given arguments.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, build the guest images, then run the benchmarks (`pagefp-bench`) with the given arguments.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ws = Workspace::new();
    let result = match cli.verb {
        Verb::Setup => setup::run(&ws),
        Verb::Build { release } => cargo_build::run(&ws, release),
        Verb::Test { args } => test::run(&ws, &args),
        Verb::Images { args } => images::run(&ws, &args),
        // The guest images first (cached), with their progress shown.
        Verb::Demo { args } => {
            images::run(&ws, &[]).and_then(|()| run_bin::run(&ws, run_bin::DEMO, &args))
        }
        Verb::Bench { args } => images::run(&ws, &[])
            .and_then(|()| setup::bench_tools(&ws))
            .and_then(|()| run_bin::run(&ws, run_bin::BENCH, &args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(&err);
            ExitCode::FAILURE
        }
    }
}

/// Prints `err` with its causes, then what to do about it.
fn report(err: &anyhow::Error) {
    let (causes, fix) = exec::describe(err);
    eprintln!("error: {causes}");
    eprintln!(
        "  fix: {}",
        fix.unwrap_or_else(|| {
            "read the messages above; `cargo xtask setup` reinstalls prerequisites".to_owned()
        })
    );
}
