//! Where things are in the workspace, and `cargo` commands that find our tools.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

/// Workspace members that only build for the BPF target. `agent/build.rs`
/// builds them through aya-build; a host build of them fails, so host-wide
/// commands (`--workspace`) exclude them.
pub const BPF_ONLY_PACKAGES: &[&str] = &["agent-ebpf"];

pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// The workspace this xtask was built from (the parent of `xtask/`).
    pub fn new() -> Self {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf();
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Project-local tools (`cargo install --root` prefix): `target/tools`.
    pub fn tools_dir(&self) -> PathBuf {
        self.root.join("target").join("tools")
    }

    /// `target/tools/bin`, put first on `PATH` for every cargo we spawn.
    pub fn tools_bin(&self) -> PathBuf {
        self.tools_dir().join("bin")
    }

    /// `cargo <subcommand>` run from the workspace root, with `target/tools/bin`
    /// first on `PATH` (bpf-linker lives there).
    pub fn cargo(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new("cargo");
        cmd.arg(subcommand)
            .current_dir(&self.root)
            .env("PATH", self.path_with_tools());
        cmd
    }

    fn path_with_tools(&self) -> OsString {
        let old = env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(self.tools_bin()).chain(env::split_paths(&old));
        // A PATH entry cannot contain ':'; fall back to the old PATH if ours does.
        env::join_paths(dirs).unwrap_or(old)
    }
}

/// `--workspace --exclude <each BPF-only package>`.
pub fn workspace_selection() -> Vec<String> {
    let mut args = vec!["--workspace".to_owned()];
    for package in BPF_ONLY_PACKAGES {
        args.extend(["--exclude".to_owned(), (*package).to_owned()]);
    }
    args
}
