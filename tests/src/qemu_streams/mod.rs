//! Real QEMU migration streams for the `qemu-proxy` tests: BIOS-only QEMU
//! guests (no kernel: `-nodefaults`, SeaBIOS finds nothing to boot and
//! idles, which already makes a complete migration stream), capturing
//! their streams, and template catalogs built from a stream's pages.

use std::{
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use agent::{
    catalog::Catalog,
    qemu_stream::{self, Options, Page, Sink, SinkError},
};
use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::qemu::{QemuBuild, Qmp};

/// A QEMU without a kernel, killed on drop.
pub struct BiosGuest {
    child: Child,
    pub qmp: Qmp,
    pub name: String,
}

impl BiosGuest {
    /// Starts QEMU 7.2 TCG with `mem_mib` of RAM and `extra` arguments;
    /// files in `dir`.
    pub fn start(dir: &Path, name: &str, mem_mib: u32, extra: &[String]) -> anyhow::Result<Self> {
        Self::start_on(QemuBuild::Debian7_2, dir, name, mem_mib, extra)
    }

    /// [`BiosGuest::start`] on the QEMU `build`.
    pub fn start_on(
        build: QemuBuild,
        dir: &Path,
        name: &str,
        mem_mib: u32,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp_path);
        let mut child = build
            .command(None)
            .args([
                "-accel",
                "tcg",
                "-nodefaults",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-m", &mem_mib.to_string()])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting QEMU {} ({})",
                    build.version(),
                    build.program().display()
                )
            })?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let qmp = loop {
            if let Ok(stream) = UnixStream::connect(&qmp_path) {
                break Qmp::new(stream)?;
            }
            if let Some(status) = child.try_wait()? {
                bail!("QEMU {name} exited during start: {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("QEMU {name} did not open its QMP socket");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Self {
            child,
            qmp,
            name: name.into(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A destination waiting on `-incoming tcp:127.0.0.1:PORT`.
    pub fn incoming(dir: &Path, name: &str, mem_mib: u32, port: u16) -> anyhow::Result<Self> {
        Self::start(
            dir,
            name,
            mem_mib,
            &["-incoming".into(), format!("tcp:127.0.0.1:{port}")],
        )
    }

    pub fn capabilities(&mut self, capabilities: &[(&str, bool)]) -> anyhow::Result<()> {
        let list: Vec<Value> = capabilities
            .iter()
            .map(|(name, state)| json!({"capability": name, "state": state}))
            .collect();
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": list })),
            )
            .map(drop)
    }

    /// Starts a migration to `uri` and waits for its end; `query-migrate`'s
    /// last answer (also when it failed).
    pub fn migrate(&mut self, uri: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.qmp.migrate(uri)?;
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.qmp.execute("query-migrate", None)?;
            if matches!(
                info["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                return Ok(info);
            }
            if Instant::now() > deadline {
                bail!("migration not done after {} s: {info}", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The whole migration stream, through `exec:cat`.
    pub fn capture(&mut self, path: &Path) -> anyhow::Result<(Vec<u8>, Value)> {
        let info = self.migrate(
            &format!("exec:cat > {}", path.display()),
            Duration::from_secs(120),
        )?;
        if info["status"] != "completed" {
            bail!("capturing the stream: {info}");
        }
        Ok((std::fs::read(path)?, info))
    }

    pub fn status(&mut self) -> anyhow::Result<String> {
        self.qmp.status()
    }

    /// Waits for the VM to run (a destination after its migration).
    pub fn wait_running(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            if status == "running" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} is {status}, not running", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for BiosGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The distinct non-zero pages of a stream, as a template catalog.
pub fn catalog_from_stream(stream: &[u8]) -> anyhow::Result<Catalog> {
    struct Pages(Catalog, std::collections::HashSet<[u8; 32]>);
    impl Sink for Pages {
        fn bytes(&mut self, _: &[u8]) -> Result<(), SinkError> {
            Ok(())
        }
        fn page(&mut self, page: Page<'_>) -> Result<(), SinkError> {
            let hash = *blake3::hash(page.data).as_bytes();
            if page.data.iter().any(|b| *b != 0) && self.1.insert(hash) {
                self.0.hashes.push(hash);
                self.0.pages.extend_from_slice(page.data);
            }
            Ok(())
        }
    }
    let mut pages = Pages(Catalog::default(), Default::default());
    qemu_stream::parse(stream, &mut pages, &Options::default())?;
    Ok(pages.0)
}
