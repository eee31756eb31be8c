//! Two libvirt hosts on one machine, for `virsh migrate` through the
//! proxies. libvirt refuses to migrate a domain to its own host (same host
//! UUID or hostname), so each daemon (`libvirtd` and its `virtlogd`, from
//! Debian's `libvirt-daemon-system`) runs as a host of its own:
//!
//! - in one network namespace of a [`ShapedLink`] (its QEMUs' loopback is
//!   the host's own, the veth between them is the WAN);
//! - in a mount namespace where `/run/libvirt`, `/var/lib/libvirt`,
//!   `/var/cache/libvirt`, `/var/log/libvirt` and `/etc/libvirt` are
//!   folders of its own (so its sockets, pid files, domain state and
//!   configuration are apart; the sockets stay reachable from outside at
//!   `<folder>/run/libvirt-sock`);
//! - in a UTS namespace with its own hostname, and with its own
//!   `host_uuid` in `libvirtd.conf`; `qemu.conf` runs QEMU as root without
//!   a security driver (the test's files are root's, in `/tmp`).
//!
//! `virsh` talks to both daemons over their sockets (a migration without
//! `--p2p`: virsh drives both ends, as an operator's client does).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{agent_process::TempDir, netns::ShapedLink, qemu::QemuBuild};

/// One libvirt daemon acting as one host.
pub struct Host {
    pub name: String,
    root: PathBuf,
}

impl Host {
    fn start(ns: &str, root: PathBuf, name: &str) -> anyhow::Result<Self> {
        for dir in ["run", "lib", "cache", "log"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        for dir in [
            "/run/libvirt",
            "/var/lib/libvirt",
            "/var/cache/libvirt",
            "/var/log/libvirt",
        ] {
            std::fs::create_dir_all(dir)?;
        }
        let etc = root.join("etc");
        copy_dir(Path::new("/etc/libvirt"), &etc)
            .context("copying /etc/libvirt (install libvirt-daemon-system: cargo xtask setup)")?;
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?;
        append(
            &etc.join("libvirtd.conf"),
            &format!("host_uuid = \"{}\"\n", uuid.trim()),
        )?;
        append(
            &etc.join("qemu.conf"),
            "security_driver = \"none\"\nuser = \"root\"\ngroup = \"root\"\nremember_owner = 0\n",
        )?;
        let r = root.display();
        let script = format!(
            "set -e
             hostname {name}
             mount --bind {r}/run /run/libvirt
             mount --bind {r}/lib /var/lib/libvirt
             mount --bind {r}/cache /var/cache/libvirt
             mount --bind {r}/log /var/log/libvirt
             mount --bind {r}/etc /etc/libvirt
             virtlogd -d -p /run/libvirt/virtlogd.pid
             libvirtd -d -p /run/libvirt/libvirtd.pid"
        );
        let output = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(["unshare", "--mount", "--uts", "--propagation", "private"])
            .args(["sh", "-c", &script])
            .output()
            .context("starting libvirtd (install libvirt-daemon-system: cargo xtask setup)")?;
        if !output.status.success() {
            bail!(
                "libvirtd for {name} did not start: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let host = Self {
            name: name.into(),
            root,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while host.virsh(&["hostname"]).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "libvirtd for {name} does not answer on {}",
                    host.socket().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(host)
    }

    fn socket(&self) -> PathBuf {
        self.root.join("run/libvirt-sock")
    }

    /// Its URI for `virsh -c`.
    pub fn uri(&self) -> String {
        format!("qemu:///system?socket={}", self.socket().display())
    }

    /// Its URI as a migration's destination (`virsh migrate ... URI`).
    pub fn migration_uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.socket().display())
    }

    /// `virsh -c <this host> ARGS`: its output, or its error.
    pub fn virsh(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("virsh")
            .args(["-c", &self.uri()])
            .args(args)
            .output()
            .context("running virsh (install libvirt-clients: cargo xtask setup)")?;
        if !output.status.success() {
            bail!(
                "virsh {} on {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A domain's state (`running`, `paused`...).
    pub fn state(&self, domain: &str) -> anyhow::Result<String> {
        Ok(self.virsh(&["domstate", domain])?.trim().to_string())
    }

    /// The first `bytes` of a domain's guest memory (QEMU's `pmemsave`).
    pub fn memory(&self, domain: &str, path: &Path, bytes: u64) -> anyhow::Result<Vec<u8>> {
        self.virsh(&[
            "qemu-monitor-command",
            domain,
            "--hmp",
            &format!("pmemsave 0 {bytes} \"{}\"", path.display()),
        ])?;
        Ok(std::fs::read(path)?)
    }

    /// Destroys its domains and stops its daemons.
    fn stop(&self) {
        if let Ok(names) = self.virsh(&["list", "--name"]) {
            for name in names.lines().filter(|n| !n.trim().is_empty()) {
                let _ = self.virsh(&["destroy", name.trim()]);
            }
        }
        for pid_file in ["libvirtd.pid", "virtlogd.pid"] {
            let pid = std::fs::read_to_string(self.root.join("run").join(pid_file))
                .ok()
                .and_then(|pid| pid.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    }
}

/// A source and a destination host, joined by a shaped link.
pub struct Hosts {
    pub source: Host,
    pub dest: Host,
    pub link: ShapedLink,
    pub dir: TempDir,
}

impl Hosts {
    /// `tag` names the link's namespaces (≤ 6 characters).
    pub fn start(tag: &str, index: u8, mbit: u32) -> anyhow::Result<Self> {
        let link = ShapedLink::new(tag, index, mbit)?;
        let dir = TempDir::new("pagefp-libvirt");
        let source = Host::start(&link.source_ns, dir.0.join("source"), "pagefp-source-host")?;
        let dest = Host::start(&link.dest_ns, dir.0.join("dest"), "pagefp-dest-host")
            .inspect_err(|_| source.stop())?;
        Ok(Self {
            source,
            dest,
            link,
            dir,
        })
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.source.stop();
        self.dest.stop();
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Whether libvirt's daemon and client are installed.
pub fn available() -> bool {
    which::which("libvirtd").is_ok() && which::which("virsh").is_ok()
}

/// The emulator libvirt runs for `build`: the system's QEMU, or for an
/// unpacked build a wrapper script written in `dir` that runs it with its
/// firmware and, in a mount namespace of its own, its module folder over
/// the system's (QEMU also looks for modules there, where 7.2's are; libvirt
/// lists every QOM type, which loads every module).
pub fn emulator(build: QemuBuild, dir: &Path) -> anyhow::Result<PathBuf> {
    let Some(root) = build.root() else {
        return which::which(build.program()).context("finding the system's QEMU");
    };
    let r = root.display();
    let script = dir.join(format!("qemu-{}.sh", build.version()));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec unshare --mount --propagation private sh -c 'mount --bind {r}/usr/lib/x86_64-linux-gnu/qemu /usr/lib/x86_64-linux-gnu/qemu && exec {} -L {r}/usr/share/qemu -L /usr/share/seabios \"$@\"' qemu \"$@\"\n",
            build.program().display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok(script)
}

/// A transient domain of `mem_mib` MiB booting `disk` (raw, IDE) on
/// `emulator`, TCG. ACPI is named: without it libvirt 9.0 passes
/// `-no-acpi`, which QEMU 9.0 and later no longer take.
pub fn domain_xml(name: &str, mem_mib: u32, disk: &Path, emulator: &Path) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <devices>
    <emulator>{}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{}'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
",
        emulator.display(),
        disk.display()
    )
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if !status.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}
