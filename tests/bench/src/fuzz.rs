//! A bounded libFuzzer run of each fuzz target in `agent/fuzz` (the QEMU
//! stream parser and its multifd channel parser, both wire protocols, the
//! catalog reader), for the
//! benchmark's `fuzz` section: executions, seconds and crashes per target.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// Every target, and the longest input each is fed.
pub const TARGETS: &[(&str, usize)] = &[
    ("qemu_stream", 65_536),
    ("qemu_multifd", 65_536),
    ("migration_wire", 16_384),
    ("proxy_wire", 16_384),
    ("catalog", 16_384),
];

#[derive(Clone, Debug, Serialize)]
pub struct FuzzRun {
    pub target: String,
    pub executions: u64,
    pub seconds: f64,
    pub crashes: u32,
    /// libFuzzer's last lines when it found a crash or failed.
    pub failure: Option<String>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `cargo-fuzz`, installed under `target/tools` by `cargo xtask bench`.
fn cargo_fuzz() -> anyhow::Result<PathBuf> {
    let path = pagefp_tests::agent_process::target_dir().join("tools/bin/cargo-fuzz");
    if !path.exists() {
        bail!(
            "{} is missing: `cargo xtask bench` installs it (cargo install cargo-fuzz --root target/tools)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs each target for `runs` executions (at most `max_seconds` each).
pub fn run(runs: u64, max_seconds: u64) -> anyhow::Result<Vec<FuzzRun>> {
    let cargo_fuzz = cargo_fuzz()?;
    let fuzz_dir = workspace().join("agent/fuzz");
    let mut out = Vec::new();
    for &(target, max_len) in TARGETS {
        let corpus = pagefp_tests::agent_process::target_dir()
            .join("pagefp-fuzz/corpus")
            .join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(target);
        let started = Instant::now();
        let mut command = Command::new(&cargo_fuzz);
        command
            .env("RUSTUP_TOOLCHAIN", "nightly")
            .current_dir(workspace().join("agent"))
            .args(["run", target, "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg("--")
            .arg(&corpus);
        if seeds.is_dir() {
            command.arg(&seeds);
        }
        command.args([
            format!("-runs={runs}"),
            format!("-max_total_time={max_seconds}"),
            format!("-max_len={max_len}"),
            "-rss_limit_mb=2048".into(),
            "-malloc_limit_mb=512".into(),
            "-print_final_stats=1".into(),
        ]);
        let output = command
            .output()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        let seconds = started.elapsed().as_secs_f64();
        let log = String::from_utf8_lossy(&output.stderr);
        let executions = executions(&log).unwrap_or(0);
        let failed = !output.status.success();
        let run = FuzzRun {
            target: target.into(),
            executions,
            seconds,
            crashes: u32::from(failed),
            failure: failed.then(|| {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            }),
        };
        println!(
            "{target:<16} {executions:>10} executions in {seconds:>6.1} s  {}",
            if failed { "CRASH/FAILURE" } else { "no crash" }
        );
        out.push(run);
    }
    Ok(out)
}

/// libFuzzer's executed-units count: `stat::number_of_executed_units: N`,
/// or `Done N runs in S second(s)`.
fn executions(log: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| {
            l.strip_prefix("stat::number_of_executed_units:")
                .and_then(|n| n.trim().parse().ok())
        })
        .or_else(|| {
            log.lines().find_map(|l| {
                l.strip_prefix("Done ")
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
            })
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn libfuzzer_counts_are_read() {
        assert_eq!(
            super::executions("x\nstat::number_of_executed_units: 1234\n"),
            Some(1234)
        );
        assert_eq!(
            super::executions("Done 1000000 runs in 12 second(s)\n"),
            Some(1_000_000)
        );
        assert_eq!(super::executions("nothing"), None);
    }
}
