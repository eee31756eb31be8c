//! cargo-fuzz, for the benchmark's fuzz part, installed under
//! `target/tools` (`cargo xtask bench` only: tests do not need it).

use std::process::Command;

use anyhow::Result;

use super::Done;
use crate::{exec, workspace::Workspace};

/// The cargo-fuzz release to install.
pub const VERSION: &str = "0.13.2";

pub fn ensure(ws: &Workspace) -> Result<Done> {
    let tools = ws.root().join("target/tools");
    let binary = tools.join("bin/cargo-fuzz");
    if binary.exists() {
        return Ok(Done::AlreadyOk(binary.display().to_string()));
    }
    exec::run(
        Command::new("cargo")
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                VERSION,
                "--root",
            ])
            .arg(&tools),
    )?;
    Ok(Done::Installed(format!(
        "cargo-fuzz {VERSION} in {}",
        binary.display()
    )))
}
