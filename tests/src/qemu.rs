//! Real QEMU guests (TCG) for the image builder, the `qemu` migration mode
//! and the QEMU proxy: a process with its serial console in a file and a QMP
//! socket, killed on drop, and a small blocking QMP client.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// How to boot a guest.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub mem_mib: u32,
    /// Extra QEMU arguments (`-incoming ...`, memory backends, ...).
    pub extra: Vec<String>,
}

/// A running QEMU.
pub struct QemuGuest {
    child: Child,
    pub qmp_path: PathBuf,
    pub serial_path: PathBuf,
    pub qmp: Qmp,
}

impl QemuGuest {
    /// Boots `spec` with files in `dir` named after `name`; `wrap` runs QEMU
    /// through another command (e.g. `ip netns exec NS`).
    pub fn boot(spec: &GuestSpec, dir: &Path, name: &str, wrap: Option<Command>) -> anyhow::Result<Self> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let serial_path = dir.join(format!("{name}.serial"));
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(&serial_path);
        let mut command = match wrap {
            Some(mut wrap) => {
                wrap.arg("qemu-system-x86_64");
                wrap
            }
            None => Command::new("qemu-system-x86_64"),
        };
        command
            .args(["-accel", "tcg", "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none"])
            .args(["-m", &spec.mem_mib.to_string()])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .args(["-append", &spec.append])
            .arg("-serial")
            .arg(format!("file:{}", serial_path.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(&spec.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .context("starting qemu-system-x86_64 (install it with `cargo xtask setup`)")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let qmp = loop {
            if let Ok(stream) = UnixStream::connect(&qmp_path) {
                break Qmp::new(stream)?;
            }
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
                }
                bail!("QEMU exited during start ({status}): {}", err.trim());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("QEMU did not open its QMP socket {} within 30 s", qmp_path.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Self {
            child,
            qmp_path,
            serial_path,
            qmp,
        })
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial_path).unwrap_or_default()
    }

    /// Waits until the serial console shows `pattern`.
    pub fn wait_serial(&self, pattern: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            if serial.contains(pattern) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tail: Vec<&str> = serial.lines().rev().take(5).collect();
                bail!("the guest did not print {pattern:?} within {} s; its console ends with {tail:?}", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last heartbeat counter on the serial console.
    pub fn heartbeat(&self) -> Option<u64> {
        self.serial()
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("pagefp-heartbeat ")?.trim().parse().ok())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        let _ = self.qmp.execute("quit", None);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP connection, capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn new(stream: UnixStream) -> anyhow::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed its QMP socket");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs one command; its `return` value (events are skipped).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
        let mut request = json!({"execute": command});
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        writeln!(self.writer, "{request}")?;
        loop {
            let answer = self.read()?;
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = answer.get("error") {
                bail!("QEMU refused {command}: {}", error["desc"].as_str().unwrap_or("?"));
            }
        }
    }

    pub fn status(&mut self) -> anyhow::Result<String> {
        Ok(self.execute("query-status", None)?["status"].as_str().unwrap_or("?").to_string())
    }

    pub fn migrate(&mut self, uri: &str) -> anyhow::Result<()> {
        self.execute("migrate", Some(json!({"uri": uri}))).map(drop)
    }

    /// Waits for the migration to end; `query-migrate`'s last answer.
    pub fn wait_migration(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", None)?;
            match info["status"].as_str() {
                Some("completed") => return Ok(info),
                Some("failed") | Some("cancelled") => {
                    bail!("QEMU migration {}: {}", info["status"], info["error-desc"].as_str().unwrap_or(""))
                }
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("QEMU migration not done after {} s: {info}", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
