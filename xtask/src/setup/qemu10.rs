//! QEMU 10.0 beside the system's 7.2: Debian's `bookworm-backports` build,
//! unpacked under `target/tools/qemu-10.0` (nothing is installed system
//! wide, and the system's apt configuration is not touched: apt reads a
//! source list and keeps its package lists under `target/tools/apt`).
//!
//! Run as `target/tools/qemu-10.0/usr/bin/qemu-system-x86_64` with
//! `QEMU_MODULE_DIR` set to its module directory and `-L` to its firmware
//! (`pagefp_images::qemu::QemuBuild` does that).

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use super::Done;
use crate::{exec, workspace::Workspace};

/// The packages, at the version the tests were written against.
pub const VERSION: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "qemu-system-gui",
    "qemu-block-extra",
];
const SOURCES: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

pub fn ensure(ws: &Workspace) -> Result<Done> {
    let tools = ws.root().join("target/tools");
    let root = tools.join("qemu-10.0");
    let stamp = root.join(".pagefp-version");
    if fs::read_to_string(&stamp).is_ok_and(|v| v.trim() == VERSION)
        && root.join("usr/bin/qemu-system-x86_64").exists()
    {
        return Ok(Done::AlreadyOk(format!("{VERSION} in {}", root.display())));
    }
    let apt = tools.join("apt");
    let (lists, archives) = (apt.join("lists"), apt.join("archives"));
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(archives.join("partial"))?;
    let sources = apt.join("bookworm-backports.sources");
    fs::write(&sources, SOURCES)?;
    let apt_get = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .arg(format!("-oDir::Etc::SourceList={}", sources.display()))
            .arg("-oDir::Etc::SourceParts=/nonexistent")
            .arg(format!("-oDir::State::Lists={}", lists.display()))
            .arg(format!("-oDir::Cache::Archives={}", archives.display()))
            .arg("-oAPT::Sandbox::User=root")
            .args(args)
            .current_dir(&archives);
        cmd
    };
    exec::run(&mut apt_get(&["update"])).context("reading bookworm-backports' package list")?;
    let wanted: Vec<String> = PACKAGES.iter().map(|p| format!("{p}={VERSION}")).collect();
    let mut download = apt_get(&["download"]);
    download.args(&wanted);
    exec::run(&mut download).context("downloading QEMU 10.0 from bookworm-backports")?;
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    for entry in fs::read_dir(&archives)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") && is_wanted(&path) {
            exec::run(Command::new("dpkg").arg("-x").arg(&path).arg(&root))?;
        }
    }
    let binary = root.join("usr/bin/qemu-system-x86_64");
    let version = exec::output(
        Command::new(&binary)
            .env(
                "QEMU_MODULE_DIR",
                root.join("usr/lib/x86_64-linux-gnu/qemu"),
            )
            .arg("--version"),
    )?;
    if !version.contains("version 10.0") {
        bail!("{} says {version:?}, not 10.0", binary.display());
    }
    fs::write(&stamp, VERSION)?;
    Ok(Done::Installed(format!("{VERSION} in {}", root.display())))
}

/// Whether a downloaded .deb is one of [`PACKAGES`] at [`VERSION`].
fn is_wanted(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let version = VERSION.replace(':', "%3a");
    PACKAGES
        .iter()
        .any(|p| name.starts_with(&format!("{p}_{version}_")))
}
