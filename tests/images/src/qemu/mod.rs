//! Real QEMU guests under TCG, for the image builder, the `qemu` migration
//! benchmark and the QEMU migration proxy.
//!
//! - [`GuestSpec`]: what to boot (kernel, initramfs, command line, memory)
//!   plus extra QEMU arguments; [`crate::GuestImage::spec`]
//!   gives the spec of a built image, so the very guest that was dumped can
//!   be booted again.
//! - [`QemuGuest::boot`]: starts `qemu-system-x86_64 -accel tcg` with its
//!   serial console in a file and a QMP socket, killed when dropped.
//! - [`Qmp`] (in [`qmp`]): the blocking QMP client, with typed helpers
//!   (`stop`, `cont`, `query_status`, `pmemsave`, `migrate`,
//!   `migrate_set_parameters`, `query_migrate`, `wait_migration`).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use pagefp_images::{self as guest_images, qemu::QemuGuest};
//! let image = &guest_images::ensure_images()?[0];
//! let dir = std::env::temp_dir();
//! let dest = QemuGuest::boot(&image.spec().incoming("tcp:127.0.0.1:7001"), &dir, "dest", None)?;
//! let mut source = QemuGuest::boot(&image.spec(), &dir, "source", None)?;
//! source.wait_ready(&image.workload, Duration::from_secs(120))?;
//! source.qmp.migrate_set_parameters(serde_json::json!({"max-bandwidth": 1_000_000_000u64}))?;
//! source.qmp.migrate("tcp:127.0.0.1:7001")?;
//! let info = source.qmp.wait_migration(Duration::from_secs(300))?;
//! println!("{} bytes sent", info.ram.unwrap_or_default().transferred);
//! let beat = dest.wait_heartbeat(0, Duration::from_secs(30))?;
//! # let _ = beat; Ok(()) }
//! ```

pub mod qmp;

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
pub use qmp::{MigrationInfo, Qmp, QmpError, RamStats, VmStatus};

/// The QEMU binary (Debian's `qemu-system-x86` package).
pub const QEMU: &str = "qemu-system-x86_64";

/// Which QEMU runs a guest: the Debian release's (on `PATH`), or QEMU 10.0
/// from bookworm-backports, unpacked by `cargo xtask setup` under
/// `target/tools/qemu-10.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuBuild {
    Debian7_2,
    Backports10_0,
}

impl QemuBuild {
    pub const ALL: [QemuBuild; 2] = [QemuBuild::Debian7_2, QemuBuild::Backports10_0];

    /// "7.2" or "10.0".
    pub fn version(self) -> &'static str {
        match self {
            QemuBuild::Debian7_2 => "7.2",
            QemuBuild::Backports10_0 => "10.0",
        }
    }

    /// Where an unpacked build lives (None: the system's QEMU).
    pub fn root(self) -> Option<PathBuf> {
        match self {
            QemuBuild::Debian7_2 => None,
            QemuBuild::Backports10_0 => Some(crate::target_dir().join("tools/qemu-10.0")),
        }
    }

    /// The binary to run.
    pub fn program(self) -> PathBuf {
        match self.root() {
            None => PathBuf::from(QEMU),
            Some(root) => root.join("usr/bin/qemu-system-x86_64"),
        }
    }

    /// Whether this build is installed here.
    pub fn available(self) -> bool {
        match self.root() {
            None => which_qemu(),
            Some(_) => self.program().exists(),
        }
    }

    /// A command that runs this QEMU (through `wrap`, if given): the
    /// program, its module directory and its firmware paths.
    pub fn command(self, wrap: Option<Command>) -> Command {
        let mut command = match wrap {
            Some(mut wrap) => {
                wrap.arg(self.program());
                wrap
            }
            None => Command::new(self.program()),
        };
        if let Some(root) = self.root() {
            command
                .env(
                    "QEMU_MODULE_DIR",
                    root.join("usr/lib/x86_64-linux-gnu/qemu"),
                )
                .arg("-L")
                .arg(root.join("usr/share/qemu"))
                .args(["-L", "/usr/share/seabios"]);
        }
        command
    }
}

fn which_qemu() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(QEMU).is_file()))
}
/// What the guests of `images/init` print on their serial console once a
/// second: `pagefp-heartbeat N`, N counting up from 0 since boot.
pub const HEARTBEAT: &str = "pagefp-heartbeat ";
/// What they print once their workload started: `pagefp-ready WORKLOAD`.
pub const READY: &str = "pagefp-ready ";

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line.
    pub append: String,
    pub mem_mib: u32,
    /// Extra QEMU arguments (`-incoming ...`, `-S`, memory backends, ...).
    pub extra: Vec<String>,
}

impl GuestSpec {
    /// Adds QEMU arguments.
    #[must_use]
    pub fn with_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// Waits for an incoming migration on `uri` (`tcp:127.0.0.1:PORT`, or
    /// `defer` to give the address later with [`Qmp::migrate_incoming`]).
    #[must_use]
    pub fn incoming(self, uri: &str) -> Self {
        self.with_args(["-incoming", uri])
    }

    /// Guest RAM in the file `path` (e.g. under `/dev/shm`), mapped shared,
    /// so another process can read (or write) the guest's memory.
    #[must_use]
    pub fn shared_memory(self, path: &Path) -> Self {
        let backend = format!(
            "memory-backend-file,id=pagefp-ram,size={}M,mem-path={},share=on",
            self.mem_mib,
            path.display()
        );
        self.with_args(["-object", &backend, "-machine", "memory-backend=pagefp-ram"])
    }

    /// Every QEMU argument, the console going to `serial` and QMP listening
    /// on `qmp` (both paths).
    pub fn args(&self, serial: &Path, qmp: &Path) -> Vec<String> {
        let mut args: Vec<String> = [
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        args.extend([
            "-m".into(),
            self.mem_mib.to_string(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            self.append.clone(),
            "-serial".into(),
            format!("file:{}", serial.display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// A running QEMU, killed on drop (after a polite `quit`).
pub struct QemuGuest {
    child: Mutex<Child>,
    pub name: String,
    pub qmp_path: PathBuf,
    pub serial_path: PathBuf,
    /// QEMU's own standard error.
    pub stderr_path: PathBuf,
    pub qmp: Qmp,
}

impl QemuGuest {
    /// Boots `spec`, with files in `dir` named after `name` (`NAME.serial`,
    /// `NAME.qmp`, `NAME.stderr`); `wrap` runs QEMU through another command
    /// (e.g. `ip netns exec NS`). Returns once QMP answers.
    pub fn boot(
        spec: &GuestSpec,
        dir: &Path,
        name: &str,
        wrap: Option<Command>,
    ) -> anyhow::Result<Self> {
        Self::boot_on(QemuBuild::Debian7_2, spec, dir, name, wrap)
    }

    /// [`QemuGuest::boot`] on the QEMU `build`.
    pub fn boot_on(
        build: QemuBuild,
        spec: &GuestSpec,
        dir: &Path,
        name: &str,
        wrap: Option<Command>,
    ) -> anyhow::Result<Self> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let serial_path = dir.join(format!("{name}.serial"));
        let stderr_path = dir.join(format!("{name}.stderr"));
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(&serial_path);
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let mut command = build.command(wrap);
        command
            .args(spec.args(&serial_path, &qmp_path))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut child = command.spawn().with_context(|| {
            format!(
                "starting QEMU {} ({}; not installed? `cargo xtask setup` installs it)",
                build.version(),
                build.program().display()
            )
        })?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let qmp = loop {
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(&qmp_path) {
                match Qmp::new(stream) {
                    Ok(qmp) => break qmp,
                    Err(err) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(err.context(format!("QEMU {name}: QMP handshake")));
                    }
                }
            }
            if let Some(status) = child.try_wait()? {
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                bail!("QEMU {name} exited during start ({status}): {}", err.trim());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "QEMU {name} did not open its QMP socket {} within 30 s",
                    qmp_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Self {
            child: Mutex::new(child),
            name: name.to_owned(),
            qmp_path,
            serial_path,
            stderr_path,
            qmp,
        })
    }

    /// QEMU's process id (the wrapper's, which `ip netns exec` replaces by QEMU).
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// QEMU's exit status, if it has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().ok().flatten()
    }

    /// Everything the guest printed on its serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read(&self.serial_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the serial console shows `pattern`; fails early if QEMU exits.
    pub fn wait_serial(&self, pattern: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            if serial.contains(pattern) {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                bail!(
                    "QEMU {} exited ({status}) before its guest printed {pattern:?}; console ends with {:?}; stderr: {}",
                    self.name,
                    tail(&serial, 8),
                    std::fs::read_to_string(&self.stderr_path)
                        .unwrap_or_default()
                        .trim()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "QEMU {}: the guest did not print {pattern:?} within {} s; its console ({}) ends with {:?}",
                    self.name,
                    timeout.as_secs(),
                    self.serial_path.display(),
                    tail(&serial, 8)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the guest's ready marker (`pagefp-ready WORKLOAD`).
    pub fn wait_ready(&self, workload: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_serial(&format!("{READY}{workload}"), timeout)
    }

    /// The last heartbeat counter on the serial console.
    pub fn heartbeat(&self) -> Option<u64> {
        last_heartbeat(&self.serial())
    }

    /// Waits until the heartbeat counter exceeds `after`; the counter seen.
    /// (After a migration the destination's console starts empty, while the
    /// counter goes on from where the source left it.)
    pub fn wait_heartbeat(&self, after: u64, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(beat) = self.heartbeat().filter(|beat| *beat > after) {
                return Ok(beat);
            }
            if let Some(status) = self.exited() {
                bail!(
                    "QEMU {} exited ({status}) waiting for a heartbeat above {after}",
                    self.name
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "QEMU {}: no heartbeat above {after} within {} s (last: {:?}; console ends with {:?})",
                    self.name,
                    timeout.as_secs(),
                    self.heartbeat(),
                    tail(&self.serial(), 5)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks QEMU to quit and waits for it (killed after 5 s).
    pub fn quit(mut self) -> anyhow::Result<()> {
        self.shut_down(Duration::from_secs(5));
        Ok(())
    }

    fn shut_down(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let _ = self.qmp.send("quit");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let child = self.child.get_mut().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        self.shut_down(Duration::from_secs(2));
    }
}

/// The last `pagefp-heartbeat N` counter in `console` (kernel messages may
/// interleave with the guest's lines).
pub fn last_heartbeat(console: &str) -> Option<u64> {
    console.rsplit(HEARTBEAT).find_map(|rest| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

fn tail(text: &str, lines: usize) -> Vec<&str> {
    let mut last: Vec<&str> = text.lines().rev().take(lines).collect();
    last.reverse();
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_is_the_last_counter() {
        assert_eq!(last_heartbeat(""), None);
        assert_eq!(last_heartbeat("pagefp-ready idle\r\n"), None);
        let console = "pagefp-heartbeat 0\r\npagefp-heartbeat 1\r\n[ 3.1] x pagefp-heartbeat 12\r\npagefp-heartbeat ";
        assert_eq!(last_heartbeat(console), Some(12));
    }

    #[test]
    fn spec_arguments() {
        let spec = GuestSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "console=ttyS0".into(),
            mem_mib: 256,
            extra: Vec::new(),
        }
        .incoming("defer")
        .shared_memory(Path::new("/dev/shm/vm"));
        let args = spec.args(Path::new("/s"), Path::new("/q"));
        let joined = args.join(" ");
        assert!(joined.starts_with("-accel tcg "), "{joined}");
        assert!(joined.contains("-m 256 -kernel /k -initrd /i -append console=ttyS0 -serial file:/s -qmp unix:/q,server=on,wait=off"));
        assert!(joined.ends_with(
            "-incoming defer -object memory-backend-file,id=pagefp-ram,size=256M,mem-path=/dev/shm/vm,share=on -machine memory-backend=pagefp-ram"
        ));
    }
}
