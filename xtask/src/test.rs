//! `cargo xtask test`: setup, build, then every test on one test thread.

use anyhow::{Context as _, Result};

use crate::{
    cargo_build, exec::{self, Fix}, setup,
    workspace::{Workspace, workspace_selection},
};

pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    setup::run(ws)?;
    cargo_build::build(ws, false)?;
    // Arguments before a second `--` go to cargo, after it to the test binaries.
    let (cargo_args, test_args) = match args.iter().position(|a| a == "--") {
        Some(split) => (&args[..split], &args[split + 1..]),
        None => (args, &[][..]),
    };
    let mut cmd = ws.cargo("test");
    if !cargo_args.iter().any(|a| a == "-p" || a == "--package" || a.starts_with("--package=")) {
        cmd.args(workspace_selection());
    }
    cmd.arg("--no-fail-fast").args(cargo_args).arg("--").arg("--test-threads=1").args(test_args);
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        // In CI a privileged test that cannot run fails instead of skipping.
        cmd.env("PAGEFP_REQUIRE_PRIVILEGED", "1");
    }
    exec::run(&mut cmd)
        .context(Fix("see the failing tests above; rerun one with `cargo xtask test -- -p PACKAGE --test NAME -- --nocapture`".into()))
}
