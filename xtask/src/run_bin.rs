//! `cargo xtask demo` and `cargo xtask bench`: setup, then run a release
//! binary of the `pagefp-tests` package.

use anyhow::{Context as _, Result};

use crate::{exec::{self, Fix}, setup, workspace::Workspace};

pub const DEMO: &str = "pagefp-demo";
pub const BENCH: &str = "pagefp-bench";

pub fn run(ws: &Workspace, bin: &str, args: &[String]) -> Result<()> {
    setup::run(ws)?;
    // The demo and bench start the agent and the VMM: build them all in release.
    let mut build = ws.cargo("build");
    build.args(["--release", "-p", "agent", "--bin", "pagefp", "-p", "pagefp-tests", "--bins"]);
    exec::run(&mut build)?;
    let mut cmd = ws.cargo("run");
    cmd.args(["--release", "--quiet", "-p", "pagefp-tests", "--bin", bin, "--"]).args(args);
    exec::run(&mut cmd).context(Fix(format!("see the messages above; `{bin} --help` lists its options")))
}
