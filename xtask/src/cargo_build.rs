//! `cargo xtask build`: the whole workspace, eBPF programs included
//! (`agent/build.rs` builds them with bpf-linker from `target/tools/bin`).

use anyhow::{Context as _, Result};

use crate::{
    exec::{self, Fix},
    setup,
    workspace::{self, Workspace},
};

pub fn run(ws: &Workspace, release: bool) -> Result<()> {
    setup::check_build_tools(ws)?;
    let mut args = workspace::workspace_selection();
    if release {
        args.push("--release".into());
    }
    build(ws, &args)
}

/// `cargo build <args>` with our tools on `PATH`. Binaries included: the tests
/// start `pagefp` and `pagefp-testvmm`.
pub fn build(ws: &Workspace, args: &[String]) -> Result<()> {
    exec::run(ws.cargo("build").args(args))
        .context(Fix("fix the compile errors above, then rerun".into()))
}
