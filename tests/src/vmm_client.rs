//! Driving `pagefp-testvmm` processes from tests, the demo and benchmarks.
//!
//! [`VmmProcess`] starts the binary, waits for its control socket and kills
//! and reaps it when dropped; its typed methods cover every control command
//! (see [`crate::vmm::control`] for the protocol). [`copy_guest_memory`]
//! copies one VMM's guest memory into another (an incoming one) through
//! `/proc/PID/map_files`, as a migration does.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde_json::{Value, json};

pub use crate::vmm::{MemoryRegion, RunReport, SlotInfo, map_files::MappedRegion, workload::Op};

/// How long one request may take before the client gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Command-line arguments of one VMM.
#[derive(Clone, Debug)]
pub struct VmmArgs {
    pub socket: PathBuf,
    pub mem_mib: u32,
    pub image: Option<PathBuf>,
    /// "ring", "bitmap" or "none".
    pub dirty: String,
    pub ring_entries: u32,
    /// "auto" or "manual".
    pub harvest: String,
    pub slots: u32,
    /// Start empty, waiting for a migration (`--incoming`).
    pub incoming: bool,
}

impl VmmArgs {
    /// `mem_mib` MiB of zeroed RAM in one slot, a 65536-entry dirty ring,
    /// harvested after every run.
    pub fn new(socket: impl Into<PathBuf>, mem_mib: u32) -> Self {
        Self {
            socket: socket.into(),
            mem_mib,
            image: None,
            dirty: "ring".into(),
            ring_entries: 65536,
            harvest: "auto".into(),
            slots: 1,
            incoming: false,
        }
    }
}

/// The VMM refused a request (`"ok": false`).
#[derive(Debug, thiserror::Error)]
#[error("the VMM refused {request}: {error}")]
pub struct Refused {
    pub request: String,
    /// The VMM's `"error"` text.
    pub error: String,
}

/// Answer to `info`.
#[derive(Clone, Debug, Deserialize)]
pub struct VmmInfo {
    pub pid: u32,
    pub mem_bytes: u64,
    pub pages: u32,
    pub dirty: String,
    pub ring_entries: u32,
    pub harvest: String,
    pub slots: Vec<SlotInfo>,
    pub loop_running: bool,
    /// `running`, `paused` or `incoming`.
    pub state: String,
    /// Every region of guest memory (RAM slots, then the read-only code
    /// slot), as a migration copies them.
    pub memory: Vec<MemoryRegion>,
    /// Iterations of the current loop (a migrated loop's included).
    pub loop_iterations: u64,
    /// A `run` request's ops are not done yet (on a destination: a migrated
    /// run still finishing).
    pub run_pending: bool,
    /// Why the loop stopped, if it failed.
    #[serde(default)]
    pub loop_error: Option<String>,
}

/// Answer to `stop_loop`.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct LoopReport {
    pub iterations: u64,
    pub pages_written: u64,
    pub seconds: f64,
}

/// Answer to `harvest`.
#[derive(Clone, Debug, Deserialize)]
pub struct HarvestReport {
    /// Distinct pages written since the previous harvest.
    pub harvested: u64,
    /// Dirty-ring entries behind them (the emulator pushes one per write).
    pub entries: u64,
    /// The pages themselves, when asked for with [`VmmProcess::harvest_list`].
    #[serde(default)]
    pub pages: Option<Vec<u64>>,
}

/// Copies all of `source`'s guest memory (every region of `info.memory`,
/// the read-only code slot included) into `dest`, through
/// `/proc/PID/map_files`: what a migration does with an incoming VMM before
/// `load_state`. `source` should be paused. Returns the bytes copied.
pub fn copy_guest_memory(source: &VmmProcess, dest: &VmmProcess) -> anyhow::Result<u64> {
    let (from, to) = (source.info()?, dest.info()?);
    crate::vmm::map_files::copy_regions(from.pid, &from.memory, to.pid, &to.memory)
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

/// A running VMM, stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct VmmProcess {
    child: Child,
    socket: PathBuf,
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
        if args.incoming {
            command.arg("--incoming");
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().with_context(|| {
            format!(
                "spawning {} (build it with `cargo build -p pagefp-tests`, or set PAGEFP_TESTVMM)",
                binary.display()
            )
        })?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&args.socket) {
                break stream;
            }
            if let Some(status) = child.try_wait()? {
                bail!("pagefp-testvmm exited during start ({status}); its error is printed above");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "pagefp-testvmm did not open {} within 30 s",
                    args.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Self {
            child,
            socket: args.socket.clone(),
            stream: Mutex::new(BufReader::new(stream)),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and reads its answer, whatever its `"ok"`.
    pub fn request(&self, request: &Value) -> anyhow::Result<Value> {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(stream.get_mut(), "{request}").context("writing to the VMM")?;
        let mut line = String::new();
        stream
            .read_line(&mut line)
            .context("reading the VMM's answer (did it die or hang?)")?;
        if line.is_empty() {
            bail!("the VMM closed its control socket");
        }
        serde_json::from_str(&line).context("the VMM answered with bad JSON")
    }

    /// Sends `request`; an `"ok": false` answer becomes a [`Refused`] error.
    pub fn call(&self, request: &Value) -> anyhow::Result<Value> {
        let answer = self.request(request)?;
        if answer["ok"] != true {
            return Err(Refused {
                request: request.to_string(),
                error: answer["error"]
                    .as_str()
                    .unwrap_or("no error text")
                    .to_owned(),
            }
            .into());
        }
        Ok(answer)
    }

    fn call_as<T: for<'de> Deserialize<'de>>(&self, request: Value) -> anyhow::Result<T> {
        let answer = self.call(&request)?;
        serde_json::from_value(answer).with_context(|| format!("unexpected answer to {request}"))
    }

    pub fn info(&self) -> anyhow::Result<VmmInfo> {
        self.call_as(json!({"cmd": "info"}))
    }

    /// Runs `ops` once, in order (and harvests afterwards in auto mode).
    pub fn run(&self, ops: &[Op]) -> anyhow::Result<RunReport> {
        self.call_as(json!({"cmd": "run", "ops": ops}))
    }

    /// Runs `ops` over and over, iterations at least `interval_ms` apart.
    pub fn start_loop_every(&self, ops: &[Op], interval_ms: u64) -> anyhow::Result<()> {
        self.call(&json!({"cmd": "start_loop", "ops": ops, "interval_ms": interval_ms}))
            .map(drop)
    }

    /// Runs `ops` over and over in the background until [`Self::stop_loop`].
    pub fn start_loop(&self, ops: &[Op]) -> anyhow::Result<()> {
        self.call(&json!({"cmd": "start_loop", "ops": ops}))
            .map(drop)
    }

    pub fn stop_loop(&self) -> anyhow::Result<LoopReport> {
        self.call_as(json!({"cmd": "stop_loop"}))
    }

    /// Harvests the dirty log now (and re-protects the pages).
    pub fn harvest(&self) -> anyhow::Result<HarvestReport> {
        self.call_as(json!({"cmd": "harvest"}))
    }

    /// As [`Self::harvest`], with the list of pages.
    pub fn harvest_list(&self) -> anyhow::Result<HarvestReport> {
        self.call_as(json!({"cmd": "harvest", "list": true}))
    }

    /// Registers every memory slot again, unchanged.
    pub fn reregister(&self) -> anyhow::Result<()> {
        self.call(&json!({"cmd": "reregister"})).map(drop)
    }

    /// Stops the vCPU, even in the middle of an op; returns once it is out
    /// of KVM_RUN. Idempotent.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.call(&json!({"cmd": "pause"})).map(drop)
    }

    /// Lets the vCPU go on exactly where it stopped. Idempotent.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.call(&json!({"cmd": "resume"})).map(drop)
    }

    /// The paused VM's state blob, hex (see `vmm::snapshot`).
    pub fn save_state(&self) -> anyhow::Result<String> {
        let answer = self.call(&json!({"cmd": "save_state"}))?;
        Ok(answer["state"]
            .as_str()
            .context("no state in the answer")?
            .to_string())
    }

    /// Loads a state into an incoming VMM (whose memory was copied before);
    /// it stays paused.
    pub fn load_state(&self, state: &str) -> anyhow::Result<()> {
        self.call(&json!({"cmd": "load_state", "state": state}))
            .map(drop)
    }

    /// `running`, `paused` or `incoming`.
    pub fn state(&self) -> anyhow::Result<String> {
        Ok(self.info()?.state)
    }

    /// Every region of guest memory (`info.memory`).
    pub fn memory(&self) -> anyhow::Result<Vec<MemoryRegion>> {
        Ok(self.info()?.memory)
    }

    /// blake3 (lowercase hex) of every RAM page.
    pub fn checksums(&self) -> anyhow::Result<Vec<String>> {
        self.checksums_answer(json!({"cmd": "checksums"}))
    }

    /// blake3 (lowercase hex) of pages `first..first+count`.
    pub fn checksums_range(&self, first: u32, count: u32) -> anyhow::Result<Vec<String>> {
        self.checksums_answer(json!({"cmd": "checksums", "first": first, "count": count}))
    }

    fn checksums_answer(&self, request: Value) -> anyhow::Result<Vec<String>> {
        #[derive(Deserialize)]
        struct Hashes {
            hashes: Vec<String>,
        }
        Ok(self.call_as::<Hashes>(request)?.hashes)
    }

    /// Asks the VMM to exit and waits up to 10 s for it.
    pub fn exit(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.call(&json!({"cmd": "exit"}))?;
        self.wait_exit(Duration::from_secs(10))
            .context("the VMM answered `exit` but did not exit within 10 s")
    }

    /// Sends SIGTERM and waits up to 10 s for the process to exit.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.wait_exit(Duration::from_secs(10))
            .context("the VMM did not exit within 10 s of SIGTERM")
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("sending {signal} to the VMM"))
    }

    /// Waits up to `timeout` for the process to exit by itself; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM first: the VMM removes its socket and exits.
            if self.signal(nix::sys::signal::Signal::SIGTERM).is_err()
                || self.wait_exit(Duration::from_secs(5)).is_none()
            {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
