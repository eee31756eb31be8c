//! `cargo xtask build`: the workspace, eBPF programs included.

use anyhow::Result;

use crate::{exec, setup, workspace::{Workspace, workspace_selection}};

pub fn run(ws: &Workspace, release: bool) -> Result<()> {
    setup::check_build_tools(ws)?;
    build(ws, release)
}

/// `cargo build` of every host package and its binaries (the tests start the
/// `pagefp` and `pagefp-testvmm` binaries).
pub fn build(ws: &Workspace, release: bool) -> Result<()> {
    let mut cmd = ws.cargo("build");
    cmd.args(workspace_selection()).arg("--bins");
    if release {
        cmd.arg("--release");
    }
    exec::run(&mut cmd)
}
