//! The inputs every guest shares: Debian's kernel, one initramfs (busybox,
//! perl, python3 and the scripts in `images/`), and the QEMU that runs them.
//! Each is fetched or built once under `target/pagefp-images/inputs/` and
//! reused while its own inputs stay the same.

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The kernel: the `.deb` it came from and the extracted `vmlinuz`.
pub struct Kernel {
    pub package: PathBuf,
    pub package_blake3: String,
    pub vmlinuz: PathBuf,
}

/// The initramfs (`initrd.gz`) and what went into it.
pub struct Initramfs {
    pub path: PathBuf,
    /// blake3 of the compressed bytes QEMU loads.
    pub blake3: String,
    /// blake3 of `images/` (init, workloads and their helpers).
    pub scripts_blake3: String,
    pub files: usize,
    /// Uncompressed size.
    pub bytes: u64,
    /// Workload names: `images/workloads/NAME.sh`.
    pub workloads: Vec<String>,
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("could not run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn file_blake3(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// The first name in `dir` with `prefix` and `suffix`.
fn find_in(dir: &Path, prefix: &str, suffix: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(prefix) && name.ends_with(suffix))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Debian's current kernel (`apt-cache depends linux-image-amd64` names it),
/// downloaded with `apt-get download` and its `vmlinuz` extracted. A package
/// already here is kept while apt names no other (or apt is unavailable).
pub fn kernel(inputs: &Path) -> anyhow::Result<Kernel> {
    let current = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .find_map(|line| line.trim().strip_prefix("Depends: "))
                .map(|package| package.trim().to_owned())
        });
    let have = find_in(inputs, "linux-image-", ".deb");
    let have_name = have.as_ref().and_then(|path| {
        path.file_name()?
            .to_str()?
            .split('_')
            .next()
            .map(str::to_owned)
    });
    let package = match (&current, have) {
        (Some(current), Some(have)) if have_name.as_deref() == Some(current.as_str()) => have,
        (Some(current), have) => {
            println!("downloading the guest kernel package {current} (apt-get download)");
            let downloaded = run(
                Command::new("apt-get")
                    .args(["download", "-q", current])
                    .current_dir(inputs),
                &format!("`apt-get download {current}`"),
            );
            match (downloaded, have) {
                (Ok(_), old) => {
                    if let Some(old) = old {
                        let _ = std::fs::remove_file(old);
                    }
                    let _ = std::fs::remove_dir_all(inputs.join("kernel"));
                    find_in(inputs, &format!("{current}_"), ".deb").with_context(|| {
                        format!(
                            "`apt-get download {current}` left no .deb in {}",
                            inputs.display()
                        )
                    })?
                }
                (Err(err), Some(old)) => {
                    println!("warning: keeping {} ({err:#})", old.display());
                    old
                }
                (Err(err), None) => {
                    return Err(err.context(
                        "fetching the guest kernel: run `apt-get update` (then `cargo xtask images` again)",
                    ));
                }
            }
        }
        (None, Some(have)) => have,
        (None, None) => bail!(
            "no guest kernel: `apt-cache depends linux-image-amd64` names none (a Debian host with apt is \
             needed; run `apt-get update`), and {} holds no linux-image-*.deb",
            inputs.display()
        ),
    };
    let root = inputs.join("kernel");
    let vmlinuz = find_in(&root.join("boot"), "vmlinuz-", "");
    let vmlinuz = match vmlinuz {
        Some(vmlinuz) => vmlinuz,
        None => {
            // Only the kernel image: the guests load no modules.
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root)?;
            run(
                Command::new("sh")
                    .arg("-c")
                    .arg(r#"dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards './boot/vmlinuz-*'"#)
                    .arg("sh")
                    .arg(&package)
                    .arg(&root),
                "extracting vmlinuz from the kernel package (dpkg-deb, tar)",
            )?;
            find_in(&root.join("boot"), "vmlinuz-", "")
                .with_context(|| format!("no boot/vmlinuz-* in {}", package.display()))?
        }
    };
    Ok(Kernel {
        package_blake3: file_blake3(&package)?,
        package,
        vmlinuz,
    })
}

/// `qemu-system-x86_64 --version`'s first line.
pub fn qemu_version() -> anyhow::Result<String> {
    let version = run(
        Command::new(crate::qemu::QEMU).arg("--version"),
        "`qemu-system-x86_64 --version` (QEMU missing? run `cargo xtask setup`)",
    )?;
    Ok(version.lines().next().unwrap_or_default().trim().to_owned())
}

/// One entry of the initramfs.
enum Node {
    Dir,
    /// A host file (content read when the archive is written) and its mode.
    File(PathBuf, u32),
    Data(Vec<u8>, u32),
    Symlink(String),
    CharDevice(u32, u32),
}

/// The guests' root file system, by path inside the guest.
#[derive(Default)]
struct Rootfs {
    nodes: BTreeMap<String, Node>,
}

impl Rootfs {
    fn add(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/').to_owned();
        let mut parent = Path::new(&path).parent();
        while let Some(dir) = parent.filter(|dir| !dir.as_os_str().is_empty()) {
            self.nodes
                .entry(dir.to_string_lossy().into_owned())
                .or_insert(Node::Dir);
            parent = dir.parent();
        }
        self.nodes.insert(path, node);
    }

    /// The host file `source` (symlinks followed) at `path`, mode kept.
    fn add_host_file(&mut self, path: &str, source: &Path) -> anyhow::Result<()> {
        let real = std::fs::canonicalize(source)
            .with_context(|| format!("{} is missing", source.display()))?;
        let mode = std::fs::metadata(&real)?.permissions().mode() & 0o7777;
        self.add(path, Node::File(real, mode));
        Ok(())
    }

    /// The executable or library at `path` and every shared library it needs
    /// (at the paths `ldd` names, so the guest's loader finds them).
    fn add_elf_with_libraries(&mut self, path: &str, source: &Path) -> anyhow::Result<()> {
        self.add_host_file(path, source)?;
        let output = Command::new("ldd")
            .arg(source)
            .output()
            .context("running ldd")?;
        // A static executable: ldd says so and fails.
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let library = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(library) = library.filter(|library| library.starts_with('/')) {
                if line.contains("not found") {
                    bail!(
                        "{}: a library is missing on this host: {}",
                        source.display(),
                        line.trim()
                    );
                }
                self.add_host_file(library, Path::new(library))?;
            }
        }
        Ok(())
    }

    /// The directory tree `source` at `path`, leaving out names in `skip`.
    fn add_tree(
        &mut self,
        path: &str,
        source: &Path,
        skip: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(source)
            .with_context(|| format!("reading {}", source.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            if skip(&name) {
                continue;
            }
            let inner = format!("{path}/{name}");
            let kind = entry.file_type()?;
            if kind.is_dir() {
                self.add(&inner, Node::Dir);
                self.add_tree(&inner, &entry.path(), skip)?;
            } else if kind.is_symlink() {
                let target = std::fs::read_link(entry.path())?;
                if target.is_absolute() {
                    // Out of the tree (e.g. into /etc): the file itself, if any.
                    if entry.path().is_file() {
                        self.add_host_file(&inner, &entry.path())?;
                    }
                } else {
                    self.add(&inner, Node::Symlink(target.to_string_lossy().into_owned()));
                }
            } else if kind.is_file() {
                self.add_host_file(&inner, &entry.path())?;
            }
        }
        Ok(())
    }

    /// A `newc` cpio archive of the tree: sorted names, every time stamp and
    /// owner 0, so the same inputs give the same bytes.
    fn cpio(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        let entry = |out: &mut Vec<u8>,
                     ino: u32,
                     name: &str,
                     mode: u32,
                     rdev: (u32, u32),
                     data: &[u8]| {
            let header = format!(
                "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
                0,
                0,
                1,
                0,
                data.len(),
                0,
                0,
                rdev.0,
                rdev.1,
                name.len() + 1,
                0
            );
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            out.resize(out.len().next_multiple_of(4), 0);
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(4), 0);
        };
        for (ino, (name, node)) in (1u32..).zip(&self.nodes) {
            match node {
                Node::Dir => entry(&mut out, ino, name, 0o040755, (0, 0), &[]),
                Node::File(source, mode) => {
                    let data = std::fs::read(source)
                        .with_context(|| format!("reading {}", source.display()))?;
                    entry(&mut out, ino, name, 0o100000 | mode, (0, 0), &data);
                }
                Node::Data(data, mode) => entry(&mut out, ino, name, 0o100000 | mode, (0, 0), data),
                Node::Symlink(target) => {
                    entry(&mut out, ino, name, 0o120777, (0, 0), target.as_bytes())
                }
                Node::CharDevice(major, minor) => {
                    entry(&mut out, ino, name, 0o020600, (*major, *minor), &[])
                }
            }
        }
        entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
        Ok(out)
    }
}

/// The Python the guests run: the host's (Debian's `/usr/bin/python3`
/// first), its standard library and compiled extension modules.
fn add_python(rootfs: &mut Rootfs) -> anyhow::Result<()> {
    let python = ["/usr/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .or_else(|| which::which("python3").ok())
        .context("python3 is missing on this host (the python workload copies it): `apt-get install python3`")?;
    let paths = run(
        Command::new(&python).args([
            "-I",
            "-c",
            "import sys, sysconfig; print(sys.executable); print(sysconfig.get_path('stdlib'))",
        ]),
        "asking python3 where its standard library is",
    )?;
    let mut lines = paths.lines();
    let (Some(executable), Some(stdlib)) = (lines.next(), lines.next()) else {
        bail!("python3 did not name its executable and standard library: {paths:?}");
    };
    rootfs.add_elf_with_libraries(executable, Path::new(executable))?;
    if executable != "/usr/bin/python3" {
        rootfs.add("/usr/bin/python3", Node::Symlink(executable.to_owned()));
    }
    // What a server install has: no tests, GUI, build configuration or
    // third-party packages.
    const LEFT_OUT: &[&str] = &[
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "__phello__",
    ];
    let skip = |name: &str| {
        LEFT_OUT.contains(&name)
            || name.starts_with("config-")
            || name.starts_with("_test")
            || name.starts_with("xxlimited")
            || name.starts_with("_xxtestfuzz")
            || name.starts_with("_ctypes_test")
    };
    rootfs.add_tree(stdlib, Path::new(stdlib), &skip)?;
    let dynload = Path::new(stdlib).join("lib-dynload");
    let mut modules: Vec<PathBuf> = std::fs::read_dir(&dynload)
        .with_context(|| format!("reading {}", dynload.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "so"))
        .filter(|path| !skip(&path.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    modules.sort();
    for module in modules {
        rootfs.add_elf_with_libraries(&module.to_string_lossy(), &module)?;
    }
    Ok(())
}

/// Builds `inputs/initrd.gz` unless the archive it would hold is the one
/// already there: `images/init` as `/init`, `images/workloads/` as
/// `/workloads`, static busybox, and perl and python3 with their libraries.
pub fn initramfs(inputs: &Path, images: &Path) -> anyhow::Result<Initramfs> {
    let mut rootfs = Rootfs::default();
    for dir in [
        "dev", "proc", "sys", "tmp", "run", "root", "etc", "bin", "sbin", "usr/bin", "usr/sbin",
    ] {
        rootfs.add(dir, Node::Dir);
    }
    rootfs.add("dev/console", Node::CharDevice(5, 1));
    rootfs.add(
        "etc/hostname",
        Node::Data(b"pagefp-guest\n".to_vec(), 0o644),
    );
    rootfs.add(
        "etc/passwd",
        Node::Data(b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), 0o644),
    );
    rootfs.add("etc/group", Node::Data(b"root:x:0:\n".to_vec(), 0o644));
    let busybox = which::which("busybox").context(
        "busybox is missing on this host: run `cargo xtask setup` (installs busybox-static)",
    )?;
    rootfs.add_elf_with_libraries("/bin/busybox", &busybox)?;
    let perl = which::which("perl")
        .context("perl is missing on this host: `apt-get install perl-base`")?;
    rootfs.add_elf_with_libraries("/usr/bin/perl", &perl)?;
    // perl's core modules (Debian's perl-base: strict, warnings, ...).
    let strict = run(
        Command::new(&perl).args(["-Mstrict", "-e", "print $INC{'strict.pm'}"]),
        "asking perl where its modules are",
    )?;
    let modules = Path::new(strict.trim())
        .parent()
        .context("perl named no module directory")?;
    rootfs.add_tree(&modules.to_string_lossy(), modules, &|_| false)?;
    add_python(&mut rootfs)?;

    // The project's own scripts: their digest is recorded on its own.
    let mut scripts = Rootfs::default();
    scripts.add(
        "/init",
        Node::File(std::fs::canonicalize(images.join("init"))?, 0o755),
    );
    scripts.add_tree("/workloads", &images.join("workloads"), &|name| {
        name.starts_with('.')
    })?;
    let workloads: Vec<String> = scripts
        .nodes
        .keys()
        .filter_map(|path| {
            path.strip_prefix("workloads/")?
                .strip_suffix(".sh")
                .map(str::to_owned)
        })
        .collect();
    if workloads.is_empty() {
        bail!(
            "no workloads: {} holds no NAME.sh",
            images.join("workloads").display()
        );
    }
    let scripts_blake3 = blake3::hash(&scripts.cpio()?).to_hex().to_string();
    rootfs.nodes.append(&mut scripts.nodes);

    let archive = rootfs.cpio()?;
    let archive_blake3 = blake3::hash(&archive).to_hex().to_string();
    let path = inputs.join("initrd.gz");
    let stamp = inputs.join("initrd.cpio.blake3");
    let current = std::fs::read_to_string(&stamp).ok();
    if current.as_deref() != Some(archive_blake3.as_str()) || !path.exists() {
        let started = std::time::Instant::now();
        let tmp = path.with_extension("gz.tmp");
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut gzip = Command::new("gzip")
            .args(["-n", "-6", "-c"])
            .stdin(Stdio::piped())
            .stdout(file)
            .spawn()
            .context("running gzip")?;
        gzip.stdin.take().expect("piped").write_all(&archive)?;
        let status = gzip.wait()?;
        if !status.success() {
            bail!("gzip failed ({status}) writing {}", tmp.display());
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::write(&stamp, &archive_blake3)?;
        println!(
            "initramfs: {} files, {} MiB, {} MiB compressed ({:.1} s)",
            rootfs.nodes.len(),
            archive.len() >> 20,
            std::fs::metadata(&path)?.len() >> 20,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(Initramfs {
        blake3: file_blake3(&path)?,
        path,
        scripts_blake3,
        files: rootfs.nodes.len(),
        bytes: archive.len() as u64,
        workloads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_lists_parents_first_and_ends_with_the_trailer() {
        let mut rootfs = Rootfs::default();
        rootfs.add("/a/b/c", Node::Data(b"xyz".to_vec(), 0o644));
        rootfs.add("/a-z", Node::Symlink("a".into()));
        let archive = rootfs.cpio().unwrap();
        let text = String::from_utf8_lossy(&archive);
        let names: Vec<&str> = ["a\0", "a-z\0", "a/b\0", "a/b/c\0", "TRAILER!!!\0"]
            .into_iter()
            .filter(|name| text.contains(name))
            .collect();
        assert_eq!(names.len(), 5);
        assert!(text.find("a/b\0").unwrap() < text.find("a/b/c\0").unwrap());
        assert_eq!(archive.len() % 4, 0);
        assert!(text.starts_with("070701"));
        assert_eq!(
            archive,
            rootfs.cpio().unwrap(),
            "the same tree gives the same bytes"
        );
    }
}
