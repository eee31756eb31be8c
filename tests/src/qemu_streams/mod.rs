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
use serde_json::Value;

use crate::qemu::{QemuBuild, Qmp};

/// A QEMU without a kernel, killed on drop.
pub struct BiosGuest {
    child: Child,
    pub qmp: Qmp,
    pub name: String,
    /// QEMU's stderr, told when QEMU ends early.
    log: std::path::PathBuf,
}

impl BiosGuest {
    /// Starts QEMU 7.2 TCG with `mem_mib` of RAM and `extra` arguments;
    /// files in `dir`.
    pub fn start(dir: &Path, name: &str, mem_mib: u32, extra: &[String]) -> anyhow::Result<Self> {
        Self::start_on(QemuBuild::Debian7_2, "tcg", dir, name, mem_mib, extra)
    }

    /// [`BiosGuest::start`] on the QEMU `build` with accelerator `accel`
    /// (`tcg`, `kvm`, `kvm,dirty-ring-size=65536`).
    pub fn start_on(
        build: QemuBuild,
        accel: &str,
        dir: &Path,
        name: &str,
        mem_mib: u32,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp_path);
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log)
            .with_context(|| format!("creating QEMU's log {}", log.display()))?;
        let mut child = build
            .command(None)
            .args([
                "-accel",
                accel,
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
            .stderr(stderr)
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
            log,
        })
    }

    /// How QEMU ended, if it did, and the end of its stderr: the context
    /// of a QMP error.
    fn fate(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited: {status}"),
            Ok(None) => "still running".into(),
            Err(e) => format!("unknown: {e}"),
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "QEMU {} {status}; its stderr ({}) ends with:\n{}",
            self.name,
            self.log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Ok` while QEMU runs; once it exited, an error that says how and
    /// what its stderr ends with (`during`: what was going on).
    pub fn still_running(&mut self, during: &str) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(Some(_)) => anyhow::bail!("{} ({during})", self.fate()),
            _ => Ok(()),
        }
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
        self.qmp.migrate_set_capabilities(capabilities)
    }

    /// Starts a migration to `uri` and waits for its end; `query-migrate`'s
    /// last answer (also when it failed). With `pause-before-switchover`,
    /// it continues the paused migration as libvirt does.
    pub fn migrate(&mut self, uri: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.migrate_unexplained(uri, timeout).map_err(|e| {
            // Let QEMU finish dying so its status is known.
            std::thread::sleep(Duration::from_millis(200));
            let fate = self.fate();
            e.context(fate)
        })
    }

    fn migrate_unexplained(&mut self, uri: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.qmp.migrate(uri)?;
        let deadline = Instant::now() + timeout;
        let mut continued = false;
        loop {
            let info = self.qmp.execute("query-migrate", None)?;
            if info["status"] == "pre-switchover" {
                self.qmp.continue_switchover(&mut continued)?;
                continue;
            }
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

impl BiosGuest {
    /// The first `bytes` of guest memory, written to `path` (the guest
    /// should be paused).
    pub fn dump(&mut self, path: &Path, bytes: u64) -> anyhow::Result<Vec<u8>> {
        self.qmp.pmemsave(path, bytes)?;
        Ok(std::fs::read(path)?)
    }
}

/// The indexes of the 4 KiB pages where `a` and `b` differ (and every page
/// past the shorter one).
pub fn differing_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
    let pages = a.len().max(b.len()).div_ceil(4096);
    (0..pages)
        .filter(|&i| a.get(i * 4096..(i + 1) * 4096) != b.get(i * 4096..(i + 1) * 4096))
        .collect()
}

/// A boot disk (one 512-byte sector) whose code never stops writing guest
/// memory: real mode, it increments the first byte of every 4 KiB page
/// from 64 KiB to 640 KiB (144 pages), round after round. A small guest
/// that keeps dirtying pages at full speed under KVM.
pub fn page_writer_disk(path: &Path) -> anyhow::Result<()> {
    #[rustfmt::skip]
    let code: [u8; 30] = [
        0xFA,                         // cli
        0x31, 0xC0,                   // xor ax, ax
        0x8E, 0xD0,                   // mov ss, ax
        0xBC, 0x00, 0x7C,             // mov sp, 0x7c00
        0xBB, 0x00, 0x10,             // round: mov bx, 0x1000
        0x8E, 0xC3,                   // page:  mov es, bx
        0x26, 0xFE, 0x06, 0x00, 0x00, //        inc byte [es:0]
        0x81, 0xC3, 0x00, 0x01,       //        add bx, 0x100 (4 KiB on)
        0x81, 0xFB, 0x00, 0xA0,       //        cmp bx, 0xa000
        0x72, 0xEF,                   //        jb page
        0xEB, 0xEA,                   //        jmp round
    ];
    boot_sector(path, &code)
}

/// A boot disk whose code fills the 144 pages from 64 KiB to 640 KiB once
/// (each 16-bit word holds its page's segment) and then halts with
/// interrupts off: a guest whose memory no longer changes, so the source's
/// memory before a migration is what the destination must hold after it.
pub fn page_filler_disk(path: &Path) -> anyhow::Result<()> {
    #[rustfmt::skip]
    let code: [u8; 36] = [
        0xFA,                         // cli
        0x31, 0xC0,                   // xor ax, ax
        0x8E, 0xD0,                   // mov ss, ax
        0xBC, 0x00, 0x7C,             // mov sp, 0x7c00
        0xFC,                         // cld
        0xBB, 0x00, 0x10,             // mov bx, 0x1000
        0x8E, 0xC3,                   // page: mov es, bx
        0x31, 0xFF,                   //       xor di, di
        0x89, 0xD8,                   //       mov ax, bx
        0xB9, 0x00, 0x08,             //       mov cx, 2048 (words)
        0xF3, 0xAB,                   //       rep stosw
        0x81, 0xC3, 0x00, 0x01,       //       add bx, 0x100 (4 KiB on)
        0x81, 0xFB, 0x00, 0xA0,       //       cmp bx, 0xa000
        0x72, 0xEB,                   //       jb page
        0xF4,                         // halt: hlt
        0xEB, 0xFD,                   //       jmp halt
    ];
    boot_sector(path, &code)
}

fn boot_sector(path: &Path, code: &[u8]) -> anyhow::Result<()> {
    let mut sector = [0u8; 512];
    sector[..code.len()].copy_from_slice(code);
    sector[510] = 0x55;
    sector[511] = 0xAA;
    std::fs::write(path, sector)
        .with_context(|| format!("writing the boot disk {}", path.display()))
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
