//! Driving `pagefp-testvmm` processes from tests, the demo and benchmarks.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Command-line arguments of one VMM.
#[derive(Clone, Debug)]
pub struct VmmArgs {
    pub socket: PathBuf,
    pub mem_mib: u32,
    pub image: Option<PathBuf>,
    pub dirty: String,
    pub ring_entries: u32,
    pub harvest: String,
    pub slots: u32,
}

/// The VMM binary: `PAGEFP_TESTVMM`, or next to the running executable
/// (target/<profile>/ or target/<profile>/deps/..), built if missing.
pub fn testvmm_binary() -> PathBuf {
    if let Ok(path) = std::env::var("PAGEFP_TESTVMM") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current executable");
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("pagefp-testvmm");
        if candidate.is_file() {
            return candidate;
        }
    }
    crate::agent_process::build_binary("pagefp-tests", "pagefp-testvmm")
}

/// A running VMM, killed and reaped on drop.
pub struct VmmProcess {
    child: Child,
    stream: Mutex<BufReader<UnixStream>>,
}

impl VmmProcess {
    pub fn spawn(binary: &Path, args: &VmmArgs) -> anyhow::Result<Self> {
        if args.socket.exists() {
            bail!(
                "{} exists already: give every VMM its own socket",
                args.socket.display()
            );
        }
        let mut command = Command::new(binary);
        command
            .arg("--socket")
            .arg(&args.socket)
            .arg("--mem-mib")
            .arg(args.mem_mib.to_string())
            .arg("--dirty")
            .arg(&args.dirty)
            .arg("--ring-entries")
            .arg(args.ring_entries.to_string())
            .arg("--harvest")
            .arg(&args.harvest)
            .arg("--slots")
            .arg(args.slots.to_string());
        if let Some(image) = &args.image {
            command.arg("--image").arg(image);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&args.socket) {
                break stream;
            }
            if let Some(status) = child.try_wait()? {
                bail!("pagefp-testvmm exited during start: {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "pagefp-testvmm did not open {} within 30 s",
                    args.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Self {
            child,
            stream: Mutex::new(BufReader::new(stream)),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one request and reads its answer.
    pub fn request(&self, request: &Value) -> anyhow::Result<Value> {
        let mut stream = self.stream.lock().unwrap();
        writeln!(stream.get_mut(), "{request}").context("writing to the VMM")?;
        let mut line = String::new();
        stream
            .read_line(&mut line)
            .context("reading from the VMM")?;
        if line.is_empty() {
            bail!("the VMM closed its control socket");
        }
        serde_json::from_str(&line).context("the VMM answered with bad JSON")
    }
}

impl VmmProcess {
    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
